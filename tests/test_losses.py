"""The losses against hand-computed cases, and gradients through every Direct Distill step."""

import pytest
import torch

from dit_distillery.conditioning import TextEmbeds
from dit_distillery.errors import DistilleryError
from dit_distillery.losses import DirectDistillLoss, FlowMatchingLoss, SampleRNG, loss_from_dict
from dit_distillery.models.aaadit import AAADiT, tiny_config
from dit_distillery.noise import initial_noise
from dit_distillery.schedule import sigmas, training_schedule


def _dit(zero_output=False):
    torch.manual_seed(0)
    dit = AAADiT(**tiny_config())
    if zero_output:  # predicts velocity 0 everywhere: the losses reduce to closed forms
        with torch.no_grad():
            dit.proj_out.weight.zero_()
            dit.proj_out.bias.zero_()
    return dit


def _batch(b=2, seeds=(3, 4), steps=(4, 4), cfg=(1.0, 1.0)):
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(b, 16, 4, 4, generator=g),
            "text": TextEmbeds(torch.randn(b, 5, 32, generator=g), None),
            "target_latents": None, "seed": list(seeds), "rand_device": ["cpu"] * b,
            "num_inference_steps": list(steps), "cfg_scale": list(cfg), "where": ["r1", "r2"][:b], "row": [1, 2][:b]}


def test_flow_matching_hand_computed():
    """Zero velocity: loss = mean over samples of w(sigma_i) * mean((noise_i - x0_i)^2)."""
    batch = _batch()
    rng = SampleRNG(7, 3, ["a", "b"])
    loss, _ = FlowMatchingLoss()(_dit(zero_output=True), batch, rng)
    schedule = training_schedule("FLUX.2", mu=0.8)
    expected = 0.0
    for i in range(2):
        sigma = schedule.sample(1, rng.generator(i, "sigma"))[0]
        noise = torch.randn(16, 4, 4, generator=rng.generator(i, "noise"))
        expected += float(schedule.weight(sigma)) * float(((noise - batch["latents"][i]) ** 2).mean())
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)

    plain, _ = FlowMatchingLoss(weighting="none", sigma_sampling="uniform")(_dit(zero_output=True), batch, rng)
    noise = torch.stack([torch.randn(16, 4, 4, generator=rng.generator(i, "noise")) for i in range(2)])
    assert plain.item() == pytest.approx(float(((noise - batch["latents"]) ** 2).mean()), rel=1e-5)


def test_sample_rng_is_independent_of_the_batch():
    a = SampleRNG(0, 5, ["x", "y"]).generator(1, "noise")
    b = SampleRNG(0, 5, ["y"]).generator(0, "noise")
    assert torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))


def test_direct_distill_hand_computed():
    """Zero velocity: the student's sample is its initial noise, so loss = mse(noise(seed), target)."""
    batch = _batch()
    batch["target_latents"] = torch.randn(2, 16, 4, 4)
    loss, _ = DirectDistillLoss()(_dit(zero_output=True), batch, SampleRNG(0, 0, ["a", "b"]))
    noise = initial_noise([3, 4], (16, 4, 4)).float()
    assert loss.item() == pytest.approx(float(((noise - batch["target_latents"]) ** 2).mean()), rel=1e-5)
    # without stored teacher latents the target is the (encoded) image latents, DiffSynth's way
    batch["target_latents"] = None
    loss, _ = DirectDistillLoss()(_dit(zero_output=True), batch, SampleRNG(0, 0, ["a", "b"]))
    assert loss.item() == pytest.approx(float(((noise - batch["latents"]) ** 2).mean()), rel=1e-5)


def test_direct_distill_gradients_reach_every_step():
    dit = _dit()
    calls = []

    def keep(module, args, output):
        output.retain_grad()
        calls.append(output)

    handle = dit.proj_out.register_forward_hook(keep)
    batch = _batch(b=1, seeds=(3,), steps=(4,))
    batch["target_latents"] = torch.randn(1, 16, 4, 4)
    loss, _ = DirectDistillLoss()(dit, batch, SampleRNG(0, 0, ["a"]))
    loss.backward()
    handle.remove()
    assert len(calls) == 4  # one DiT call per student step
    for k, out in enumerate(calls):
        assert out.grad is not None and out.grad.abs().sum() > 0, f"no gradient through step {k}"
    assert dit.blocks[0].to_q.weight.grad.abs().sum() > 0


def test_direct_distill_uses_each_rows_steps_and_cfg_and_the_chosen_mu():
    dit = _dit()
    calls = []
    dit.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    batch = _batch(steps=(2, 3), cfg=(1.0, 3.0))
    batch["target_latents"] = torch.randn(2, 16, 4, 4)
    empty = TextEmbeds(torch.zeros(1, 5, 32), None)
    DirectDistillLoss()(dit, batch, SampleRNG(0, 0, ["a", "b"]), empty)
    assert sorted(calls) == [1, 1, 2, 2, 2]  # 2 plain steps; 3 steps with cond+uncond in one call
    loss = DirectDistillLoss(mu="diffsynth")
    assert loss.student_sigmas("qwen_image", 4, torch.zeros(1, 16, 128, 128)) == pytest.approx(
        [1.0, 0.77764, 0.47078, 0.02], abs=1e-4)
    assert DirectDistillLoss().student_sigmas("qwen_image", 4, torch.zeros(1, 16, 128, 128)) == pytest.approx(
        sigmas("Qwen-Image", 4, image_seq_len=64 * 64))
    with pytest.raises(DistilleryError, match="negative"):
        DirectDistillLoss()(dit, batch, SampleRNG(0, 0, ["a", "b"]))
    batch["seed"] = [None, 1]
    with pytest.raises(DistilleryError, match="seed"):
        DirectDistillLoss()(dit, batch, SampleRNG(0, 0, ["a", "b"]))


def test_loss_from_dict_validates():
    assert isinstance(loss_from_dict({"kind": "direct_distill", "steps": 4}), DirectDistillLoss)
    assert loss_from_dict({"kind": "flow_matching"}).to_dict()["kind"] == "flow_matching"
    with pytest.raises(DistilleryError, match="kind"):
        loss_from_dict({"kind": "gan"})  # dmd and trajectory exist (test_losses_dmd.py, _trajectory.py)
    with pytest.raises(DistilleryError, match="stepz"):
        loss_from_dict({"kind": "direct_distill", "stepz": 4})
    with pytest.raises(DistilleryError, match="mu"):
        loss_from_dict({"kind": "direct_distill", "mu": "fast"})
