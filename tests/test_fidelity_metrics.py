"""The fidelity measures (omnireel.training.fidelity) can pass and can fail: the scenes' own renders
score at the ceiling, a flat frame with silence scores nothing."""
import numpy as np

from omnireel.training.fidelity import score
from omnireel.training.scenes import make_scene, render_frames, soundtrack

RATE = 16000


def test_ground_truth_scores_at_the_ceiling():
    for seed in (20_000_000, 20_000_002, 20_000_006):
        scene = make_scene(seed, language="en")
        truth = render_frames(scene)
        s = score(scene, truth, soundtrack(scene, RATE), RATE, truth)
        assert s.colour_ok and s.frames_vary and s.audio_sounds
        assert s.count_ok == s.count_frames > 0
        assert s.shape_measured and s.shape_ok     # these three seeds are one square, one circle, one triangle
        assert max(s.track_errors) < 1.0 and s.track_found == s.track_total
        assert s.contacts > 0 and s.contacts_heard >= 0.75 * s.contacts


def test_a_flat_silent_clip_fails_every_measure():
    scene = make_scene(20_000_000, language="en")
    truth = render_frames(scene)
    flat = np.full_like(truth, 128)
    s = score(scene, flat, np.zeros(2 * RATE, dtype=np.float32), RATE, truth)
    assert not s.colour_ok and not s.frames_vary and not s.audio_sounds
    assert s.count_ok == 0 and s.track_found == 0 and s.contacts == 0 and s.onsets == 0
    assert np.mean(s.track_errors) > 8
