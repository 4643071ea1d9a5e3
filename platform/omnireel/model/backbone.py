"""The spacetime joint-attention transformer (DESIGN.md §3 "Block").

Plain PyTorch. Tensor parallelism is applied from outside (parallel/tp.py): q, k, v, o and the MLP
are separate nn.Linear modules, and attention reshapes with -1 heads so a rank sees its share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import build_attention_mask, joint_attention, packed_attention_mask
from .config import LANGUAGES, MODALITIES, MODALITY_GROUPS, BackboneConfig
from .layout import TokenLayout, patchify, unpatchify
from .rope import SpacetimeRoPE, apply_rope

FIRST_OPTIONAL_MODALITY = MODALITIES.index("motion")   # modalities from here on came with optional streams
OPTIONAL_STREAMS_SEED = 7919


@dataclass
class ConditionTokens:
    """Raw features of the clean inputs, B rows sharing one layout."""
    captions: torch.Tensor   # (B, L_text, text_dim): all captions, in layout order
    language: torch.Tensor   # (B,) long index into LANGUAGES
    voices: torch.Tensor     # (B, V, speaker_dim)
    refs: torch.Tensor       # (B, R, C, h, w) reference-image latents
    voice_names: torch.Tensor | None = None   # (B, V, text_dim): the bound characters' names, pooled
    tracks: torch.Tensor | None = None        # (B, N * T, track_dim): trajectory tokens, layout order

    def repeat(self, n: int) -> "ConditionTokens":
        def rows(t):
            return None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))
        return ConditionTokens(*(rows(t) for t in (self.captions, self.language, self.voices, self.refs,
                                                   self.voice_names, self.tracks)))


@dataclass
class PreparedLayout:
    """Per-request tensors computed once, reused by every denoising step."""
    layout: TokenLayout
    rope: tuple[torch.Tensor, torch.Tensor]   # cos, sin (L, head_dim/2)
    mask: object                               # None | (L, L) bool | BlockMask
    modality: torch.Tensor                     # (L,) long
    timestep: torch.Tensor                     # (L,) long
    cue: torch.Tensor | None = None            # (L,) bool: audio cue tokens


@dataclass
class BackboneRows:
    """One job's rows of a packed forward: OmniBackbone.forward's arguments (B rows sharing one layout;
    B = 2 for the CFG branches of a guided job)."""
    video: torch.Tensor                  # (B, C, T, h, w)
    audio: torch.Tensor                  # (B, Ca, Ta)
    sigmas: torch.Tensor                 # (B, 3) = (clean 0, video, audio)
    cond: ConditionTokens                # B rows
    prep: PreparedLayout
    drop_captions: torch.Tensor | None = None   # (B,) bool: rows whose captions are the null caption

    @property
    def tokens(self) -> int:
        return self.video.shape[0] * self.prep.layout.length


@dataclass
class PackedLayout:
    """Several jobs' rows as one varlen sequence (1, N, d), N = sum of rows x length: what a block needs
    of a layout (rope, mask, timestep), over the packed tokens. Job j's rows sit one after the other
    from offsets[j]; its tokens index the sigma table of its own rows only, and the block-diagonal
    mask keeps every row to its own tokens."""
    rope: tuple[torch.Tensor, torch.Tensor]   # cos, sin (N, head_dim/2)
    mask: object                               # attention.PackedMask | BlockMask
    timestep: torch.Tensor                     # (N,) long into the (rows x 3) sigma table
    groups: tuple[torch.Tensor, ...]           # per weight group (text, video, audio): its token indices
    offsets: tuple[int, ...]                   # first token of each job


def pack_layouts(jobs: list[BackboneRows], device) -> PackedLayout:
    """The PackedLayout of `jobs`, in order."""
    cos, sin, timestep, groups, offsets = [], [], [], [[], [], []], []
    start, first_row = 0, 0
    for job in jobs:
        prep, rows, length = job.prep, job.video.shape[0], job.prep.layout.length
        offsets.append(start)
        cos.append(prep.rope[0].repeat(rows, 1))
        sin.append(prep.rope[1].repeat(rows, 1))
        row_ids = torch.arange(first_row, first_row + rows, device=device).repeat_interleave(length)  # (rows*L,)
        timestep.append(prep.timestep.repeat(rows) + 3 * row_ids)
        for group, span in zip(groups, prep.layout.group_spans()):
            row_starts = start + length * torch.arange(rows, device=device)                          # (rows,)
            group.append((row_starts[:, None] + torch.arange(span.start, span.stop, device=device)).flatten())
        start, first_row = start + rows * length, first_row + rows
    mask = packed_attention_mask([(o, j.video.shape[0], j.prep.layout, j.prep.mask) for o, j in zip(offsets, jobs)],
                                 device)
    return PackedLayout(rope=(torch.cat(cos), torch.cat(sin)), mask=mask, timestep=torch.cat(timestep),
                        groups=tuple(torch.cat(g) for g in groups), offsets=tuple(offsets))


class ModalityLinear(nn.Module):
    """One nn.Linear per weight group (text, video, audio), applied to its tokens: one contiguous span
    per group (a single layout), or one index tensor per group (a packed batch: PackedLayout.groups)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.groups = nn.ModuleDict({g: nn.Linear(d_in, d_out) for g in MODALITY_GROUPS})

    def forward(self, x: torch.Tensor, group_spans) -> torch.Tensor:
        if isinstance(group_spans[0], slice):
            return torch.cat([lin(x[:, span]) for lin, span in zip(self.groups.values(), group_spans)], 1)
        outputs = [lin(x[:, index]) for lin, index in zip(self.groups.values(), group_spans)]  # (B, n_g, d_out)
        out = outputs[0].new_empty(x.shape[0], x.shape[1], outputs[0].shape[-1])               # (B, L, d_out)
        for index, y in zip(group_spans, outputs):
            out[:, index] = y
        return out


def linear(d_in: int, d_out: int, per_modality: bool) -> nn.Module:
    return ModalityLinear(d_in, d_out) if per_modality else nn.Linear(d_in, d_out)


def apply_linear(module: nn.Module, x: torch.Tensor, group_spans) -> torch.Tensor:
    return module(x, group_spans) if isinstance(module, ModalityLinear) else module(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig, per_modality: bool):
        super().__init__()
        d = cfg.dim
        self.head_dim = cfg.head_dim
        self.q, self.k, self.v, self.o = (linear(d, d, per_modality) for _ in range(4))
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps)   # per head: no cross-rank reduction under TP
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps)

    def forward(self, x, prep: PreparedLayout, group_spans):
        B, L, _ = x.shape
        q = self.q_norm(apply_linear(self.q, x, group_spans).view(B, L, -1, self.head_dim))  # (B, L, H, hd)
        k = self.k_norm(apply_linear(self.k, x, group_spans).view(B, L, -1, self.head_dim))
        v = apply_linear(self.v, x, group_spans).view(B, L, -1, self.head_dim)
        cos, sin = prep.rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = joint_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), prep.mask)  # (B, H, L, hd)
        return apply_linear(self.o, out.transpose(1, 2).reshape(B, L, -1), group_spans)


class MLP(nn.Module):
    def __init__(self, cfg: BackboneConfig, per_modality: bool):
        super().__init__()
        self.up = linear(cfg.dim, cfg.mlp_hidden, per_modality)
        self.down = linear(cfg.mlp_hidden, cfg.dim, per_modality)

    def forward(self, x, group_spans):
        return apply_linear(self.down, F.gelu(apply_linear(self.up, x, group_spans), approximate="tanh"), group_spans)


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig, per_modality: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=cfg.eps)
        self.attn = Attention(cfg, per_modality)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=cfg.eps)
        self.mlp = MLP(cfg, per_modality)
        self.modulation = nn.Parameter(torch.randn(6, cfg.dim) / math.sqrt(cfg.dim))  # per-block offset

    def forward(self, x, time_mod, prep: PreparedLayout, group_spans):
        """x (B, L, d); time_mod (B, n_t, 6, d): modulation per distinct timestep."""
        mod = (time_mod + self.modulation)[:, prep.timestep]            # gather per token: (B, L, 6, d)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.unbind(2)
        h = self.norm1(x) * (1 + scale_a) + shift_a
        x = x + gate_a * self.attn(h, prep, group_spans)
        h = self.norm2(x) * (1 + scale_m) + shift_m
        return x + gate_m * self.mlp(h, group_spans)


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """sigma (...,) in [0, 1] -> sinusoidal features (..., dim) of 1000 * sigma."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = 1000.0 * sigma.float()[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], -1)


class OmniBackbone(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        patch_dim = cfg.video_channels * math.prod(cfg.patch)
        # input embeddings (one per stream) and a learned modality embedding
        self.text_adapter = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.null_caption = nn.Parameter(torch.zeros(d))       # CFG's unconditional caption
        self.language_embed = nn.Embedding(len(LANGUAGES), d)
        self.voice_embed = nn.Linear(cfg.speaker_dim, d)         # + the character's name, through text_adapter
        self.patch_embed = nn.Linear(patch_dim, d)               # video and reference latents
        self.audio_embed = nn.Linear(cfg.audio_channels, d)
        self.modality_embed = nn.Embedding(len(MODALITIES), d, _weight=torch.empty(len(MODALITIES), d))
        with torch.no_grad():
            self.modality_embed.weight[:FIRST_OPTIONAL_MODALITY].normal_()
        # timestep -> adaLN modulation, computed once per distinct timestep
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        k = cfg.modality_blocks
        self.blocks = nn.ModuleList(Block(cfg, per_modality=(i < k or i >= cfg.layers - k))
                                    for i in range(cfg.layers))
        self.rope = SpacetimeRoPE(cfg.rope_split, cfg.rope_theta, cfg.rope_time_scale)
        # output: final adaLN (shift, scale) and velocity heads for video and audio tokens
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.eps)
        self.head_modulation = nn.Parameter(torch.randn(2, d) / math.sqrt(d))
        self.video_head = nn.Linear(d, patch_dim)
        self.audio_head = nn.Linear(d, cfg.audio_channels)
        # Optional streams (trajectory tokens, audio cues) draw their initial weights from a forked RNG,
        # so every other weight of a seeded checkpoint is what it was before these streams existed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed() + OPTIONAL_STREAMS_SEED)
            self.track_embed = nn.Linear(cfg.track_dim, d)               # trajectory (motion) tokens
            self.cue_embed = nn.Parameter(torch.randn(d) / math.sqrt(d))  # audio tokens at collision cues
            with torch.no_grad():
                self.modality_embed.weight[FIRST_OPTIONAL_MODALITY:].normal_()
            if cfg.caption_modulation:               # zero at first: the timestep embedding alone
                self.caption_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, d))
                nn.init.zeros_(self.caption_modulation[1].weight)
                nn.init.zeros_(self.caption_modulation[1].bias)

    def prepare(self, layout: TokenLayout, device) -> PreparedLayout:
        """Everything about the token layout that does not change between denoising steps."""
        return PreparedLayout(layout=layout, rope=self.rope(layout.position.to(device)),
                              mask=build_attention_mask(layout.shot, layout.caption, device),
                              modality=layout.modality.to(device), timestep=layout.timestep.to(device),
                              cue=None if layout.cue is None or not layout.cue.any() else layout.cue.to(device))

    def embed(self, video, audio, cond: ConditionTokens, prep: PreparedLayout, drop_captions) -> torch.Tensor:
        """All streams -> (B, L, d) in layout order."""
        B = video.shape[0]
        patch = self.cfg.patch
        text = self.text_adapter(cond.captions)                                     # (B, Lt, d)
        if drop_captions is not None:
            text = torch.where(drop_captions[:, None, None], self.null_caption.to(text.dtype), text)
        refs = cond.refs.flatten(0, 1).unsqueeze(2)                                 # (B*R, C, 1, h, w)
        ref_span = prep.layout.spans["ref"]
        ref_tokens = patchify(refs, patch).reshape(B, ref_span.stop - ref_span.start, self.patch_embed.in_features)
        voices = self.voice_embed(cond.voices)                                      # (B, V, d)
        if cond.voice_names is not None:
            voices = voices + self.text_adapter(cond.voice_names)
        streams = [text, self.language_embed(cond.language)[:, None], voices, self.patch_embed(ref_tokens)]
        if "motion" in prep.layout.spans:
            streams.append(self.track_embed(cond.tracks))                           # (B, N*T, d)
        streams += [self.patch_embed(patchify(video, patch)), self.audio_embed(audio.transpose(1, 2))]
        x = torch.cat(streams, 1) + self.modality_embed(prep.modality)
        if prep.cue is not None:
            x = x + prep.cue[:, None].to(x.dtype) * self.cue_embed.to(x.dtype)
        return x

    def forward(self, video: torch.Tensor, audio: torch.Tensor, sigmas: torch.Tensor,
                cond: ConditionTokens, prep: PreparedLayout, drop_captions: torch.Tensor | None = None):
        """video (B, C, T, h, w), audio (B, Ca, Ta), sigmas (B, 3) = (clean 0, video, audio)
        -> velocities of the same shapes as video and audio."""
        x = self.embed(video, audio, cond, prep, drop_captions)                          # (B, L, d)
        t_emb, time_mod = self.time_modulations(sigmas, x.dtype, self.pooled_caption(x, prep))  # (B, 3, d), (B, 3, 6, d)
        x = self.transform(x, t_emb, time_mod, prep, prep.layout.group_spans())
        return self.velocities(x, prep)

    def forward_packed(self, jobs: list[BackboneRows]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One forward over several jobs (different layouts, sigmas, rows) packed into one varlen
        sequence with a block-diagonal mask; a row never sees another row's tokens, so each job's
        velocities are what `forward` gives it alone (up to float rounding). -> per job, its
        (v_video (B, C, T, h, w), v_audio (B, Ca, Ta))."""
        device = jobs[0].video.device
        xs = [self.embed(j.video, j.audio, j.cond, j.prep, j.drop_captions) for j in jobs]   # (B_j, L_j, d)
        x = torch.cat([x.flatten(0, 1) for x in xs])[None]                                  # (1, N, d)
        sigmas = torch.cat([j.sigmas for j in jobs])                                         # (R, 3)
        pooled = None if not self.cfg.caption_modulation else \
            torch.cat([self.pooled_caption(x_job, j.prep) for x_job, j in zip(xs, jobs)])    # (R, d)
        t_emb, time_mod = self.time_modulations(sigmas, x.dtype, pooled)                     # (R, 3, d), (R, 3, 6, d)
        packed = pack_layouts(jobs, device)
        x = self.transform(x, t_emb.flatten(0, 1)[None], time_mod.flatten(0, 1)[None], packed, packed.groups)
        out = []
        for job, offset, x_job in zip(jobs, packed.offsets, xs):
            rows, length = x_job.shape[:2]
            out.append(self.velocities(x[0, offset:offset + rows * length].view(rows, length, -1), job.prep))
        return out

    def pooled_caption(self, x: torch.Tensor, prep: PreparedLayout) -> torch.Tensor | None:
        """x (B, L, d) embedded tokens -> (B, d) the mean of their caption tokens (every shot's; the
        null caption's where captions were dropped), or None without caption modulation."""
        if not self.cfg.caption_modulation:
            return None
        return x[:, prep.layout.spans["text"]].mean(1)

    def time_modulations(self, sigmas: torch.Tensor, dtype,
                         caption: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """sigmas (B, 3), caption (B, d) pooled or None -> the timestep embeddings (B, 3, d) and the
        blocks' adaLN table (B, 3, 6, d)."""
        features = timestep_embedding(sigmas, self.cfg.freq_dim)                        # float32 (B, 3, freq_dim)
        t_emb = self.time_embed(features.to(self.time_embed[0].weight.dtype)).to(dtype)  # (B, 3, d)
        if caption is not None:
            t_emb = t_emb + self.caption_modulation(caption)[:, None].to(dtype)
        return t_emb, self.time_modulation(t_emb).unflatten(-1, (6, self.cfg.dim))

    def transform(self, x, t_emb, time_mod, prep, group_spans) -> torch.Tensor:
        """The blocks and the final adaLN norm over x (B, L, d); `prep` a PreparedLayout or a PackedLayout
        (its timestep indexes dim 1 of t_emb (B, n_t, d) and time_mod (B, n_t, 6, d))."""
        for block in self.blocks:
            x = block(x, time_mod, prep, group_spans)
        shift, scale = (t_emb[:, :, None] + self.head_modulation)[:, prep.timestep].unbind(2)  # (B, L, d)
        return self.norm_out(x) * (1 + scale) + shift

    def velocities(self, x: torch.Tensor, prep: PreparedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, d) of one layout -> v_video (B, C, T, h, w), v_audio (B, Ca, Ta)."""
        spans = prep.layout.spans
        v_video = unpatchify(self.video_head(x[:, spans["video"]]), prep.layout.video_grid, self.cfg.patch)
        v_audio = self.audio_head(x[:, spans["audio"]]).transpose(1, 2)
        return v_video, v_audio

    def flops_per_forward(self, tokens: int, batch: int = 1) -> int:
        """Matmul FLOPs of one forward over `tokens` (2 per multiply-add; the formula benchmarks use)."""
        d, h, n = self.cfg.dim, self.cfg.mlp_hidden, tokens
        linear_flops = 2 * n * (4 * d * d + 2 * d * h)       # q, k, v, o + MLP up, down
        attention_flops = 4 * n * n * d                       # QK^T and AV
        return batch * self.cfg.layers * (linear_flops + attention_flops)
