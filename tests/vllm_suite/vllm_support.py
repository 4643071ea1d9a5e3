"""Helpers of the vLLM suite: finding vLLM's engine processes and where their threads may run, and
the tiny decoder the LLM storyboard planner runs on."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import psutil

# A 2-layer Qwen2 decoder small enough for CPU (vLLM's CPU attention needs head_dim 32+: 128 / 2 = 64),
# over MiniLM's WordPiece vocabulary (30522 tokens; [CLS] = 101 as BOS, [SEP] = 102 as EOS).
TINY_DECODER = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "vocab_size": 30528, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "float32",
    "bos_token_id": 101, "eos_token_id": 102,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def write_tiny_decoder(folder: Path, weights: bool = False, **overrides) -> Path:
    """The tiny decoder's model folder: its config (TINY_DECODER with `overrides`), MiniLM's tokenizer
    and, with `weights`, random weights (seed 0) as safetensors, so it loads as a real model folder
    (without them: vLLM's load_format="dummy")."""
    from omnireel.model.text import resolve_text_model
    folder.mkdir(parents=True, exist_ok=True)
    config = {**TINY_DECODER, **overrides}
    for name in TOKENIZER_FILES:
        shutil.copy(resolve_text_model("all-MiniLM-L6-v2") / name, folder / name)
    if weights:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(**config)).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    return folder

ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker")   # the titles vLLM gives its engine core and worker
SPAWNED = "from multiprocessing.spawn import spawn_main"   # a spawned child's command line, before any title


def title(process: psutil.Process) -> str:
    """The process's title (Ray and vLLM rewrite argv: "ray::ServeReplica:...", "VLLM::Worker")."""
    return " ".join(process.cmdline()).strip()


def is_engine(process: psutil.Process) -> bool:
    """Whether `process` is one of vLLM's engine processes (its engine core or model worker): vLLM
    titles them, and on CPU it always starts them with multiprocessing's spawn. The title cannot be
    relied on: setproctitle gives up, silently, in a process whose first environment entry was
    rewritten before setproctitle was imported, and vLLM's imports (cv2, vllm.env_override) rewrite
    LD_LIBRARY_PATH, so an engine whose environment lists LD_LIBRARY_PATH first keeps its spawn
    command line for good (seen under Serve replicas: both processes, for the whole run)."""
    name = title(process)
    return name.startswith(ENGINE_TITLES) or SPAWNED in name


def engine_processes(root: psutil.Process | None = None) -> list[psutil.Process]:
    """The live vLLM engine processes under `root` (default: this process). A local Ray started by
    this process is under it too (GCS, raylet, workers), and so are the engines its workers start;
    other sessions' on the same machine are not."""
    found = []
    for process in (root or psutil.Process()).children(recursive=True):
        try:
            if is_engine(process):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def ray_ancestry(process: psutil.Process) -> tuple[str | None, int]:
    """(the title of the nearest Ray worker above `process`, how many levels up it is: 1 for a
    child), or (None, 0) if there is none."""
    for depth, parent in enumerate(process.parents(), start=1):
        try:
            if title(parent).startswith("ray::"):
                return title(parent), depth
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None, 0
    return None, 0


def thread_cpus(process: psutil.Process) -> set[frozenset[int]]:
    """The distinct CPU sets the process's threads may run on (OpenMP binding pins each thread)."""
    found = set()
    for thread in process.threads():
        try:
            found.add(frozenset(os.sched_getaffinity(thread.id)))
        except OSError:            # the thread ended meanwhile
            continue
    return found
