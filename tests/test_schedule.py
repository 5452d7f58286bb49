"""Sigma schedules against DiffSynth-Studio's values (reference facts §1), computed through diffusers' scheduler."""

import math

import pytest
import torch

from dit_distillery import schedule
from dit_distillery.errors import DistilleryError

QWEN_TABLE = [  # (mu or image side, N, sigmas) from DiffSynth's "Qwen-Image" template
    (0.8, 4, [1, 0.77764, 0.47078, 0.02]),
    (0.8, 8, [1, .92209, .83175, .72574, .59958, .44694, .25850, .02]),
    (0.8, 15, [1, .96468, .92656, .8853, .84048, .79164, .7382, .67947, .61464, .5427, .46242, .37225, .27024,
               .15391, .02]),
]


@pytest.mark.parametrize("mu,n,expected", QWEN_TABLE)
def test_qwen_image_template_matches_diffsynth(mu, n, expected):
    assert schedule.sigmas("Qwen-Image", n, mu=mu) == pytest.approx(expected, abs=6e-5)


@pytest.mark.parametrize("side,mu,expected", [
    (1328, 0.83432, [1, 0.78098, 0.47555, 0.02]),
    (1024, 0.69355, [1, 0.76671, 0.45561, 0.02]),
])
def test_qwen_image_resolution_mu(side, mu, expected):
    tokens = (side // 16) ** 2  # DiffSynth's dynamic_shift_len: packed 2x2 tokens of the 1/8 latent
    assert schedule.mu_for("Qwen-Image", tokens, 4) == pytest.approx(mu, abs=1e-5)
    assert schedule.sigmas("Qwen-Image", 4, image_seq_len=tokens) == pytest.approx(expected, abs=6e-5)
    # training=True keeps DiffSynth's fixed mu 0.8 whatever the resolution
    assert schedule.sigmas("Qwen-Image", 4, image_seq_len=tokens, training=True) == pytest.approx(
        QWEN_TABLE[0][2], abs=6e-5)


def test_flux2_template_matches_diffsynth():
    assert schedule.mu_for("FLUX.2", 256, 30) == pytest.approx(1.7712, abs=1e-4)
    s = schedule.sigmas("FLUX.2", 30, image_seq_len=256)
    assert len(s) == 30 and s[0] == pytest.approx(1.0)
    assert s[1] == pytest.approx(0.99417, abs=6e-5)
    assert s[-2:] == pytest.approx([0.29569, 0.16852], abs=6e-5)  # no terminal stretch: the last jump is to 0
    assert schedule.sigmas("FLUX.2", 4, mu=0.8) == pytest.approx([1, .86973, .68997, .42590], abs=6e-5)
    assert schedule.sigmas("FLUX.2", 4) == schedule.sigmas("FLUX.2", 4, mu=0.8)  # no resolution: DiffSynth's 0.8
    # above 4300 tokens the empirical mu no longer depends on the step count
    assert schedule.mu_for("FLUX.2", 5000, 4) == schedule.mu_for("FLUX.2", 5000, 50)


def test_lightning_template_uses_ln3_and_no_terminal():
    for tokens in (256, 4096, 8000):
        assert schedule.mu_for("Qwen-Image-Lightning", tokens, 4) == pytest.approx(math.log(3))
    s = schedule.sigmas("Qwen-Image-Lightning", 4, image_seq_len=4096)
    assert s == pytest.approx([1.0, 0.9, 0.75, 0.5], abs=1e-6)  # 3s/(1+2s) at s = 1, 3/4, 1/2, 1/4


def test_scheduler_config_is_qwen_images():
    config = schedule.scheduler("Qwen-Image").config
    assert (config.time_shift_type, config.use_dynamic_shifting, config.shift_terminal) == ("exponential", True, 0.02)
    assert (config.base_shift, config.max_shift, config.base_image_seq_len, config.max_image_seq_len) == (0.5, 0.9, 256, 8192)
    assert schedule.template_for("qwen_image") == "Qwen-Image" and schedule.template_for("aaadit") == "FLUX.2"


def test_training_weights_on_qwen_grid():
    ts = schedule.training_schedule("Qwen-Image")
    assert ts.mu == 0.8 and len(ts.sigmas) == 1000
    assert float(ts.sigmas[0]) == pytest.approx(1.0) and float(ts.sigmas[-1]) == pytest.approx(0.02, abs=1e-6)
    peak = int(ts.weights.argmax())
    assert peak == 698 and float(ts.weights[peak]) == pytest.approx(1.683, abs=1e-3)
    assert float(ts.sigmas[peak]) == pytest.approx(0.4996, abs=1e-4)
    assert float(ts.weights.mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(ts.weights[0]) == 0.0 and float(ts.weights[-1]) == pytest.approx(0.104, abs=1e-3)
    assert float(ts.weight(0.5)) == pytest.approx(1.683, abs=1e-3)
    assert ts.weight(torch.tensor([1.0, 0.02])).tolist() == pytest.approx([0.0, 0.104], abs=1e-3)


def test_training_weights_on_flux2_grid():
    ts = schedule.training_schedule("FLUX.2")
    assert float(ts.sigmas[-1]) == pytest.approx(0.00222, abs=1e-5)
    assert float(ts.weights.max()) == pytest.approx(1.693, abs=1e-3)
    assert float(ts.weights[-1]) == pytest.approx(0.0116, abs=1e-4)


def test_training_sampling_and_mu_policy():
    ts = schedule.training_schedule("Qwen-Image")
    g = torch.Generator().manual_seed(0)
    drawn = ts.sample(256, g, lo=0.5, hi=1.0)
    assert drawn.shape == (256,) and bool((drawn <= ts.sigmas[500]).all())
    assert bool(torch.isin(drawn, ts.sigmas).all())
    res = schedule.training_schedule("Qwen-Image", mu_policy="resolution", image_seq_len=6889)
    assert res.mu == pytest.approx(0.83432, abs=1e-5)
    with pytest.raises(DistilleryError):
        schedule.training_mu("resolution", "Qwen-Image")
    with pytest.raises(DistilleryError):
        schedule.training_mu("cosine", "Qwen-Image")


@pytest.mark.parametrize("template,steps", [("SDXL", 4), ("Qwen-Image", 0), ("FLUX.2", 2.5)])
def test_bad_input(template, steps):
    with pytest.raises(DistilleryError):
        schedule.sigmas(template, steps)


def test_one_step_is_a_single_jump_for_every_template():
    from dit_distillery.schedule import TEMPLATES, sigmas
    for template in TEMPLATES:
        assert sigmas(template, 1) == [1.0]
        assert sigmas(template, 1, image_seq_len=4096) == [1.0]
