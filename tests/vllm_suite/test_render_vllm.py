"""A render whose checkpoint says `text.backend = "vllm"` matches the torch backend's render."""
from __future__ import annotations

from omnireel.config import GenerationRequest
from omnireel.model.text import VLLMTextEncoder

LATENT_TOLERANCE = 1e-5
"""Max abs difference allowed between the two backends' latents, 10x below DESIGN.md §2's 1e-4 for
drivers. Measured on CPU (float32): 1.3e-6 video, 4.8e-7 audio; the text features differ by ~5e-6."""

REQUEST = GenerationRequest(
    prompt="a fox crosses a frozen lake at dawn", seconds=1.0, fps=8, size="64x64", seed=3,
    shots=[{"prompt": "the fox wakes in its den", "seconds": 0.5},
           {"prompt": "it runs across the ice", "camera": "tracking shot", "seconds": 0.5}])


def test_render_through_vllm_matches_the_torch_backend(tiny_engine, vllm_engine):
    assert isinstance(vllm_engine.components["text_encoder"], VLLMTextEncoder)
    assert vllm_engine.config.text.backend == "vllm" and tiny_engine.config.text.backend == "hf"
    torch_result = tiny_engine.render(REQUEST)
    vllm_result = vllm_engine.render(REQUEST)
    assert len(vllm_result.plan.captions) == 3
    video = (vllm_result.latents.video - torch_result.latents.video).abs().max().item()
    audio = (vllm_result.latents.audio - torch_result.latents.audio).abs().max().item()
    print(f"\nvllm vs torch backend latents: max abs video {video:.2e}, audio {audio:.2e}")
    assert video <= LATENT_TOLERANCE and audio <= LATENT_TOLERANCE
    assert vllm_result.artifact.media_type == "video/mp4" and vllm_result.artifact.data
