"""The packed token layout, the shot mask (DESIGN.md §3 visibility rule) and spacetime RoPE."""
import itertools

import pytest
import torch

from omnireel.model.attention import build_attention_mask
from omnireel.model.config import MODALITY_ID, preset
from omnireel.model.layout import AUDIO_SIGMA, CLEAN, VIDEO_SIGMA, LayoutSpec, build_layout
from omnireel.model.rope import SpacetimeRoPE

CFG = preset("tiny").backbone


def layout_for(shots: int, fps: float = 25.0, latent_frames: int = 13):
    starts = tuple(sorted({round(i * latent_frames / shots) for i in range(shots)}))
    assert len(starts) == shots
    captions = (5,) if shots == 1 else (5,) + tuple(3 + i for i in range(shots))
    spec = LayoutSpec(latent_frames=latent_frames, latent_height=4, latent_width=4, fps=fps,
                      audio_frames=50, shot_starts=starts, caption_lengths=captions, voices=2, refs=1)
    return build_layout(spec, CFG)


def expected_visible(layout, i, j) -> bool:
    """DESIGN.md §3, written out token by token from the roles, not from the shot-id formula."""
    def role(t):
        modality = int(layout.modality[t])
        shot = int(layout.shot[t])
        if modality == MODALITY_ID["text"] and shot >= 0:
            return ("caption", shot)
        if modality in (MODALITY_ID["video"], MODALITY_ID["audio"]):
            return ("media", shot)
        return ("global", None)   # global caption, language, voice and reference tokens

    (ri, si), (rj, sj) = role(i), role(j)
    if ri == "caption" and rj == "caption":
        return si == sj
    if ri == "caption":
        return rj == "global" or si == sj
    if rj == "caption":
        return ri == "global" or si == sj
    return True   # media and global tokens see all media of every shot and every global token


@pytest.mark.parametrize("shots", [1, 2, 6])
def test_shot_mask_follows_the_visibility_rule(shots):
    layout = layout_for(shots)
    mask = build_attention_mask(layout.shot, layout.caption, "cpu")
    if shots == 1:
        assert mask is None, "one shot must build no mask at all"
        return
    assert mask.shape == (layout.length, layout.length)
    n = layout.length
    expected = torch.tensor([[expected_visible(layout, i, j) for j in range(n)] for i in range(n)])
    assert torch.equal(mask, expected)
    # spot checks of the rule's consequences
    caps = [torch.nonzero(layout.caption & (layout.shot == s)).flatten() for s in range(shots)]
    video = torch.nonzero(layout.modality == MODALITY_ID["video"]).flatten()
    first_shot_media, last_shot_media = video[layout.shot[video] == 0], video[layout.shot[video] == shots - 1]
    assert not mask[caps[0][0], caps[1][0]]                         # captions of different shots
    assert not mask[first_shot_media[0], caps[1][0]]                 # media never see another shot's caption
    assert mask[first_shot_media[0], last_shot_media[-1]]            # scene context across cuts
    assert mask[caps[0][0], 0]                                       # captions see the global caption


def test_layout_streams_positions_and_timesteps():
    layout = layout_for(2)
    s = layout.spans
    assert [k for k in s] == ["text", "lang", "voice", "ref", "video", "audio"]
    assert s["video"].stop - s["video"].start == 13 * 2 * 2          # (1, 2, 2) patches of a 4x4 latent
    assert (layout.timestep[s["video"]] == VIDEO_SIGMA).all()
    assert (layout.timestep[s["audio"]] == AUDIO_SIGMA).all()
    assert (layout.timestep[: s["ref"].stop] == CLEAN).all()
    assert (layout.position[: s["ref"].stop, 0] < 0).all()          # text, voice, refs at negative times
    assert (layout.position[s["audio"], 1:] == 0).all()             # audio: y = x = 0
    # the cut adds the shot gap to both video and audio times
    t_video = layout.position[s["video"], 0]
    assert t_video.diff().max() > CFG.shot_gap_seconds


def test_video_and_audio_of_the_same_instant_get_the_same_rope_time():
    fps = 25.0   # latent k starts at frame 4k-3, i.e. at (4k-3)/25 s = audio latent 4k-3
    layout = layout_for(1, fps=fps)
    s = layout.spans
    rope = SpacetimeRoPE(CFG.rope_split, CFG.rope_theta, CFG.rope_time_scale)
    cos, sin = rope(layout.position)
    t_channels = CFG.rope_split[0] // 2
    video_pos, audio_pos = layout.position[s["video"]], layout.position[s["audio"]]
    per_frame = 4
    pairs = 0
    for k in range(1, 13):
        v_tok = s["video"].start + k * per_frame
        a_tok = s["audio"].start + 4 * k - 3
        if 4 * k - 3 >= 50:
            break
        assert layout.position[v_tok, 0] == layout.position[a_tok, 0]
        assert torch.equal(cos[v_tok, :t_channels], cos[a_tok, :t_channels])
        assert torch.equal(sin[v_tok, :t_channels], sin[a_tok, :t_channels])
        pairs += 1
    assert pairs >= 10
    # and different instants do differ
    assert not torch.equal(cos[s["audio"].start + 1, :t_channels], cos[s["audio"].start + 2, :t_channels])
    assert video_pos[:, 0].unique().numel() == 13 and audio_pos[:, 0].unique().numel() == 50


def test_rope_buffers_are_recomputed_after_to_empty():
    with torch.device("meta"):
        rope = SpacetimeRoPE(CFG.rope_split, CFG.rope_theta, CFG.rope_time_scale)
    rope.to_empty(device="cpu")
    rope.init_buffers()
    reference = SpacetimeRoPE(CFG.rope_split, CFG.rope_theta, CFG.rope_time_scale)
    assert torch.equal(rope.inv_freq, reference.inv_freq)


def test_bad_layout_specs_are_rejected():
    with pytest.raises(ValueError, match="global caption plus one per shot"):
        LayoutSpec(latent_frames=5, latent_height=2, latent_width=2, fps=24, audio_frames=4,
                   shot_starts=(0, 2), caption_lengths=(3,))
    with pytest.raises(ValueError, match="at least one latent frame"):
        LayoutSpec(latent_frames=2, latent_height=2, latent_width=2, fps=24, audio_frames=4,
                   shot_starts=(0, 2), caption_lengths=(3, 1, 1))


def test_dense_mask_is_symmetric_and_reflexive():
    layout = layout_for(6)
    mask = build_attention_mask(layout.shot, layout.caption, "cpu")
    assert torch.equal(mask, mask.T) and mask.diagonal().all()
    assert not all(itertools.chain.from_iterable(mask.tolist()))
