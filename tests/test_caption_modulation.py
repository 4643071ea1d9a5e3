"""The backbone's adaLN caption conditioning (BackboneConfig.caption_modulation): zero-initialised it
leaves the backbone what it was without it; trained (here: random weights) the caption changes the
velocities through it, and the packed forward of several jobs still equals each job's own forward."""
from __future__ import annotations

import dataclasses

import torch

from omnireel.model.backbone import BackboneRows, ConditionTokens, OmniBackbone
from omnireel.model.config import preset
from omnireel.model.layout import LayoutSpec, build_layout

BASE = preset("tiny").backbone
WITH = dataclasses.replace(BASE, caption_modulation=True)


def job(backbone: OmniBackbone, seed: int, caption_tokens: int, frames: int = 3):
    g = torch.Generator().manual_seed(seed)
    cfg = backbone.cfg
    spec = LayoutSpec(latent_frames=frames, latent_height=4, latent_width=4, fps=12.0, audio_frames=8,
                      shot_starts=(0,), caption_lengths=(caption_tokens,), voices=0, refs=0)
    prep = backbone.prepare(build_layout(spec, cfg), "cpu")
    rows = 2
    cond = ConditionTokens(captions=torch.randn(rows, caption_tokens, cfg.text_dim, generator=g),
                           language=torch.zeros(rows, dtype=torch.long),
                           voices=torch.zeros(rows, 0, cfg.speaker_dim),
                           refs=torch.zeros(rows, 0, cfg.video_channels, 4, 4),
                           tracks=torch.zeros(rows, 0, cfg.track_dim))
    video = torch.randn(rows, cfg.video_channels, frames, 4, 4, generator=g)
    audio = torch.randn(rows, cfg.audio_channels, 8, generator=g)
    sigmas = torch.stack([torch.zeros(rows), torch.rand(rows, generator=g), torch.rand(rows, generator=g)], 1)
    return BackboneRows(video=video, audio=audio, sigmas=sigmas, cond=cond, prep=prep,
                        drop_captions=torch.tensor([False, True]))


def forward(backbone, j):
    return backbone(j.video, j.audio, j.sigmas, j.cond, j.prep, drop_captions=j.drop_captions)


def test_zero_initialised_caption_modulation_leaves_the_backbone_unchanged():
    torch.manual_seed(0)
    plain = OmniBackbone(BASE).eval()
    torch.manual_seed(0)
    modulated = OmniBackbone(WITH).eval()
    state = modulated.state_dict()
    assert {k for k in state if k.startswith("caption_modulation.")} == {"caption_modulation.1.weight",
                                                                       "caption_modulation.1.bias"}
    # every other weight is the one the seed gave without it
    for name, value in plain.state_dict().items():
        assert torch.equal(state[name], value), name
    j = job(plain, 1, 5)
    with torch.no_grad():
        for a, b in zip(forward(plain, j), forward(modulated, j)):
            assert torch.equal(a, b)


def test_the_caption_drives_the_modulation_and_packing_keeps_each_job_its_own():
    torch.manual_seed(0)
    backbone = OmniBackbone(WITH).eval()
    with torch.no_grad():
        for p in backbone.caption_modulation.parameters():
            p.normal_(0, 0.2)
    jobs = [job(backbone, 1, 5), job(backbone, 2, 7, frames=2)]
    with torch.no_grad():
        alone = [forward(backbone, j) for j in jobs]
        packed = backbone.forward_packed(jobs)
        for (va, aa), (vp, ap) in zip(alone, packed):
            assert (va - vp).abs().max() < 1e-5 and (aa - ap).abs().max() < 1e-5
        # the same tokens with the pooled path switched off differ: the modulation carries the caption
        base = OmniBackbone(BASE).eval()
        base.load_state_dict({k: v for k, v in backbone.state_dict().items() if not k.startswith("caption_")})
        v_off, _ = forward(base, jobs[0])
        assert (alone[0][0] - v_off).abs().max() > 1e-3
