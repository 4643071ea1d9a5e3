"""VideoVAE: shapes, causality in both directions, tiled decode == untiled decode."""
import dataclasses

import pytest
import torch

from omnireel.model.config import preset
from omnireel.model.vae import VideoVAE, tile_starts

CFG = preset("tiny").vae


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VideoVAE(CFG).eval()


def frames(t, h, w, batch=2):
    torch.manual_seed(1)
    return torch.rand(batch, 3, t, h, w) * 2 - 1  # (B, 3, T, H, W) in [-1, 1]


@torch.inference_mode()
def test_shapes_and_range(vae):
    latents = vae.encode(frames(9, 32, 48))
    assert latents.shape == (2, CFG.latent_channels, 3, 4, 6)
    out = vae.decode(latents)
    assert out.shape == (2, 3, 9, 32, 48)
    assert out.abs().max() <= 1
    # Untrained, but not degenerate: outputs vary and depend on the latents.
    assert out.std() > 1e-2
    assert (vae.decode(torch.randn_like(latents)) - out).abs().mean() > 1e-3
    assert vae.decode(torch.randn(1, CFG.latent_channels, 1, 2, 3)).shape == (1, 3, 1, 16, 24)


@torch.inference_mode()
def test_encode_is_causal(vae):
    clip = frames(13, 16, 16)
    latents = vae.encode(clip)                               # (B, C, 4, 2, 2)
    for k in range(3):
        prefix = vae.encode(clip[:, :, :1 + 4 * k])
        assert torch.allclose(prefix, latents[:, :, :1 + k], atol=1e-5)
    # ... and not trivially: frame 5 belongs to latent 2, so changing it moves latents 2 and 3 only.
    changed = clip.clone()
    changed[:, :, 5] = 0
    moved = (vae.encode(changed) - latents).abs().amax(dim=(0, 1, 3, 4))  # (L,)
    assert moved[:2].max() < 1e-6 and moved[2:].min() > 1e-4


@torch.inference_mode()
def test_decode_is_causal(vae):
    torch.manual_seed(2)
    latents = torch.randn(2, CFG.latent_channels, 4, 2, 3)
    out = vae.decode(latents)                                # (B, 3, 13, 16, 24)
    for k in range(3):
        prefix = vae.decode(latents[:, :, :1 + k])
        assert torch.allclose(prefix, out[:, :, :1 + 4 * k], atol=1e-5)
    # Latent 2 drives frames 5..8 and, through temporal mixing, later ones; never frames 0..4.
    changed = latents.clone()
    changed[:, :, 2] = 0
    moved = (vae.decode(changed) - out).abs().amax(dim=(0, 1, 3, 4))  # (T,)
    assert moved[:5].max() < 1e-6 and moved[5:].min() > 1e-4


@torch.inference_mode()
def test_tiled_decode_matches_untiled(vae):
    torch.manual_seed(3)
    latents = torch.randn(1, CFG.latent_channels, 2, 40, 36)  # several tiles each way
    untiled = VideoVAE(dataclasses.replace(CFG, tile_latents=0)).eval()
    untiled.load_state_dict(vae.state_dict())
    reference = untiled.decode(latents)
    for tile, overlap in [(16, 2), (12, 4)]:
        assert len(tile_starts(40, tile, overlap)) > 2 and len(tile_starts(36, tile, overlap)) > 2
        tiled = VideoVAE(dataclasses.replace(CFG, tile_latents=tile, tile_overlap=overlap)).eval()
        tiled.load_state_dict(vae.state_dict())
        # Measured: ~6e-8 (float rounding). Tiles carry enough context to cover the decoder's
        # receptive field; one latent less gives ~3e-3 and no context ~7e-2.
        assert (tiled.decode(latents) - reference).abs().max() < 1e-5


def test_bad_shapes_raise(vae):
    with pytest.raises(ValueError, match="1 \\+ 4n"):
        vae.encode(frames(8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(frames(5, 20, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, CFG.latent_channels + 1, 2, 2, 2))
