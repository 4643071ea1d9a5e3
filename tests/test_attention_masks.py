"""The FlexAttention block mask that every GPU run takes gives the same attention as the dense mask
that small CPU runs take, on the layouts of real multi-shot plans (CPU FlexAttention runs here)."""
import pytest
import torch

from omnireel.config import GenerationRequest
from omnireel.families.omni import denoise_layout_spec
from omnireel.model.attention import dense_shot_mask, flex_shot_mask, joint_attention
from omnireel.model.layout import build_layout
from omnireel.stages import MediaLatents, TextEmbeddings, VoiceEmbeddings


def layout_of(tiny_engine, request):
    plan = tiny_engine.plan(request)
    cfg = tiny_engine.config
    text = TextEmbeddings([torch.zeros(3 + i, cfg.backbone.text_dim) for i in range(len(plan.captions))])
    media = MediaLatents(torch.zeros(len(plan.elements), cfg.vae.latent_channels, plan.latent_height, plan.latent_width))
    voice = VoiceEmbeddings(torch.zeros(len(plan.voices), cfg.backbone.speaker_dim))
    return build_layout(denoise_layout_spec(plan, text, voice, media), cfg.backbone)


@pytest.mark.parametrize("shots", [2, 3, 6])
def test_flex_block_mask_attends_exactly_as_the_dense_mask(tiny_engine, shots):
    request = GenerationRequest(prompt="a scene", size="64x64", fps=8, seconds=shots * 0.5,
                                shots=[{"prompt": f"shot {i}", "seconds": 0.5} for i in range(shots)])
    layout = layout_of(tiny_engine, request)
    dense = dense_shot_mask(layout.shot, layout.caption)                       # (L, L) bool
    assert not dense.all() and dense.any(dim=-1).all()                         # a real mask; no row fully masked
    g = torch.Generator().manual_seed(shots)
    q, k, v = (torch.randn(2, 4, layout.shot.numel(), 16, generator=g) for _ in range(3))   # (B, H, L, hd)
    expected = joint_attention(q, k, v, dense)
    flex = joint_attention(q, k, v, flex_shot_mask(layout.shot, layout.caption))
    assert (flex - expected).abs().max().item() <= 1e-5
    assert (joint_attention(q, k, v, None) - expected).abs().max().item() > 1e-3   # the mask matters
