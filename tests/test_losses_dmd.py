"""DMD2 on tiny AAADiTs: the DMD gradient's fixed point, the fake score's online training, backward simulation on
the student's own schedule at 1/2/4 steps, one shared base or a separate teacher, exact state round trips, and a
toy where the student is pulled back onto a (trained) teacher's distribution."""

from functools import partial

import pytest
import torch

from dit_distillery import losses_dmd
from dit_distillery.conditioning import TextEmbeds
from dit_distillery.errors import DistilleryError
from dit_distillery.lora import add_lora
from dit_distillery.losses import DirectDistillLoss, DMDLoss, SampleRNG, loss_from_dict
from dit_distillery.losses_dmd import FAKE_ADAPTER, active_adapter
from dit_distillery.models.aaadit import AAADiT, tiny_config
from dit_distillery.sampling import euler_denoise
from dit_distillery.velocity import predict_velocity


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _student(lora_scale=0.1, seed=0, **config):
    """A tiny AAADiT (the teacher) plus a LoRA whose B is random (the student differs from the teacher)."""
    torch.manual_seed(seed)
    dit = AAADiT(**tiny_config(**(config or {"width": 32, "num_blocks": 1, "latent_channels": 4})))
    add_lora(dit, "aaadit", rank=4)
    with torch.no_grad():
        for n, p in dit.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, lora_scale)
    return dit


def _batch(b=2, channels=4, text=None, steps=None):
    g = torch.Generator().manual_seed(1)
    text = text if text is not None else TextEmbeds(torch.randn(b, 5, 32, generator=g), None)
    return {"latents": torch.zeros(b, channels, 4, 4), "text": text, "num_inference_steps": [steps] * b,
            "where": [f"r{i}" for i in range(b)], "row": list(range(b))}


def _setup(loss, dit, lr=1e-3, **options):
    loss.attach(dit, lr=lr, **options)
    return loss


def _fake_steps(loss, batch, step=0):
    """The trainer's call: the fake updates, each on a batch of the stream (here the same prompts each time)."""
    draws = iter(range(100))
    return loss.before_step(step, lambda: (batch, SampleRNG(0, step, [f"aux{next(draws)}:{r}" for r in batch["row"]])))


def _student_grads(dit):
    return {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}


def test_generator_gradient_is_zero_when_fake_equals_real():
    """A fresh fake score IS the teacher (its LoRA's B is zero): with teacher CFG 1 both scores agree everywhere,
    so the DMD gradient vanishes exactly; once they differ it does not."""
    dit = _student()
    loss = _setup(DMDLoss(steps=2, teacher_cfg=1.0, fake_rank=4), dit)
    batch, rng = _batch(), SampleRNG(0, 0, ["a", "b"])
    value, logs = loss(dit, batch, rng)
    value.backward()
    grads = _student_grads(dit)
    assert value.item() == 0.0 and grads and all(float(g.abs().max()) == 0.0 for g in grads.values())

    dit.zero_grad()
    with torch.no_grad():
        for p in loss.fake_params:
            p.normal_(0, 0.1)
    value, _ = loss(dit, batch, rng)
    value.backward()
    assert value.item() > 0 and any(float(g.abs().max()) > 0 for g in _student_grads(dit).values())


def test_fake_score_learns_and_leaves_the_student_alone():
    dit = _student()
    trainable = {n for n, p in dit.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in dit.named_parameters()}
    batch, rng = _batch(b=4), SampleRNG(0, 0, list(range(4)))
    with torch.no_grad():
        student_out = predict_velocity(dit, torch.ones(4, 4, 4, 4), torch.full((4,), 0.5), batch["text"])
    loss = _setup(DMDLoss(steps=1, fake_rank=8, fake_lr=2e-2), dit)
    assert {n for n, p in dit.named_parameters() if p.requires_grad} == trainable  # the trainer's set unchanged
    with torch.no_grad():
        x0, _, _ = loss.generate(dit, batch, rng, "fixed", grad=False)
    fake = [loss.fake_update(x0, batch["text"], rng, "fixed") for _ in range(8)]  # same samples, sigmas, noise
    assert fake[-1] < 0.8 * fake[0], fake
    assert {n for n, p in dit.named_parameters() if p.requires_grad} == trainable
    for n, p in dit.named_parameters():
        if FAKE_ADAPTER not in n:
            assert torch.equal(p, before[n]), n  # only the fake adapter moved
    with torch.no_grad():  # and the student's own calls do not see it
        assert torch.equal(predict_velocity(dit, torch.ones(4, 4, 4, 4), torch.full((4,), 0.5), batch["text"]),
                           student_out)
        with active_adapter(dit, FAKE_ADAPTER):
            fake_out = predict_velocity(dit, torch.ones(4, 4, 4, 4), torch.full((4,), 0.5), batch["text"])
    assert not torch.equal(fake_out, student_out)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_backward_simulation_runs_the_students_own_schedule(steps, monkeypatch):
    dit = _student()
    loss = _setup(DMDLoss(steps=steps, fake_updates=1), dit, empty_text=TextEmbeds(torch.zeros(1, 5, 32), None))
    b = 8
    batch, rng = _batch(b=b), SampleRNG(3, 1, list(range(b)))
    grid = loss.student_sigmas("aaadit", steps, batch["latents"])
    calls = []
    real = losses_dmd.predict_velocity

    def spy(model, x, sigma, text):
        calls.append((torch.is_grad_enabled(), sorted({round(float(s), 6) for s in sigma})))
        return real(model, x, sigma, text)

    monkeypatch.setattr(losses_dmd, "predict_velocity", spy)
    x0, xk, sk = loss.generate(dit, batch, rng, "gen")
    on_grid = {round(s, 6) for s in grid}
    assert all(set(s) <= on_grid for _, s in calls)  # every student call at one of its own sigmas
    with_grad = [s for g, s in calls if g]
    assert len(with_grad) == 1 and set(with_grad[0]) == {round(float(s), 6) for s in sk}
    if steps > 1:
        assert len(set(sk.tolist())) > 1  # rows are trained at different steps of the sampler
    monkeypatch.setattr(losses_dmd, "predict_velocity", real)
    # a row at the sampler's last step gets exactly the student's few-step sample from its noise
    last = [i for i in range(b) if abs(float(sk[i]) - grid[-1]) < 1e-7]
    assert last, "8 rows and no last step"
    for i in last:
        noise = torch.randn(4, 4, 4, generator=rng.generator(i, "gen/noise"))[None]
        with torch.no_grad():
            sample = euler_denoise(partial(predict_velocity, dit), noise, grid, batch["text"].select([i]))
        torch.testing.assert_close(x0[i].detach(), sample[0], atol=1e-5, rtol=1e-5)
    # the generator loss at these steps is finite and reaches the student's LoRA
    _fake_steps(loss, batch)
    value, logs = loss(dit, batch, rng)
    value.backward()
    assert torch.isfinite(value) and logs["dmd"] >= 0
    assert any(float(g.abs().max()) > 0 for g in _student_grads(dit).values())


@pytest.fixture(scope="module")
def trained_teacher():
    """A tiny AAADiT trained by flow matching on a narrow distribution (a fixed pattern + 0.1 noise), so its
    score is a real one; a random network's is not the score of anything."""
    torch.manual_seed(0)
    dit = AAADiT(**tiny_config(width=32, num_blocks=1, latent_channels=4))
    g = torch.Generator().manual_seed(0)
    text = TextEmbeds(torch.randn(1, 5, 32, generator=g), None)
    pattern = torch.randn(4, 4, 4, generator=g)
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    for _ in range(120):
        x0 = pattern + 0.1 * torch.randn(32, 4, 4, 4, generator=g)
        s, eps = torch.rand(32, generator=g), torch.randn(32, 4, 4, 4, generator=g)
        x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        ((predict_velocity(dit, x_t, s, text.repeat(32)) - (eps - x0)) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in dit.state_dict().items()}, text, pattern


def test_dmd_moves_the_student_onto_the_teachers_distribution(trained_teacher):
    state, text, pattern = trained_teacher
    torch.manual_seed(0)
    dit = AAADiT(**tiny_config(width=32, num_blocks=1, latent_channels=4))
    dit.load_state_dict(state)
    add_lora(dit, "aaadit", rank=4)
    with torch.no_grad():  # the student starts off the teacher's distribution
        for n, p in dit.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(hash(n) % 1000))
    loss = _setup(DMDLoss(steps=2, teacher_cfg=1.0, fake_rank=8, fake_lr=3e-3), dit)
    noise = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    grid = loss.student_sigmas("aaadit", 2, noise)

    def distance():  # mean squared distance of the student's 2-step samples from the teacher's data
        with torch.no_grad():
            samples = euler_denoise(partial(predict_velocity, dit), noise, grid, text.repeat(64))
        return float(((samples - pattern) ** 2).mean())

    opt = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=3e-3, weight_decay=0)
    batch = _batch(b=8, text=text.repeat(8))
    start = distance()
    for step in range(8):
        rng = SampleRNG(0, step, list(range(8)))
        _fake_steps(loss, batch, step)
        value, _ = loss(dit, batch, rng)
        assert torch.isfinite(value)
        value.backward()
        opt.step()
        opt.zero_grad()
    assert distance() < 0.85 * start, (start, distance())


def test_separate_teacher_full_training_and_exact_state_round_trip():
    """Full training: the teacher is kept as it was (a copy) and carries the fake adapter; the student has none.
    state_dict/load_state_dict carry the fake LoRA and its AdamW state, so the next update is identical."""
    torch.manual_seed(0)
    dit = AAADiT(**tiny_config(width=32, num_blocks=1, latent_channels=4))
    loss = _setup(DMDLoss(steps=2, fake_rank=4, fake_updates=2), dit)
    assert loss.host is not dit and not loss.shared and not any("lora" in n for n, _ in dit.named_parameters())
    batch = _batch(b=2)
    assert _fake_steps(loss, batch)["fake_loss"] > 0
    value, _ = loss(dit, batch, SampleRNG(0, 0, ["a", "b"]), TextEmbeds(torch.zeros(1, 5, 32), None))
    value.backward()
    assert all(p.grad is not None for p in dit.parameters() if p.requires_grad)
    with torch.no_grad():  # the student moves; the teacher copy must not
        for p in dit.parameters():
            p.add_(0.01)
    saved = loss.state_dict()
    assert len(saved["fake"]) == len(loss.fake_params) and saved["optimizer"]["state"]

    other = DMDLoss(**{k: v for k, v in loss.to_dict().items() if k != "kind"})
    torch.manual_seed(0)
    _setup(other, AAADiT(**tiny_config(width=32, num_blocks=1, latent_channels=4)))
    other.load_state_dict(saved)
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    a = loss.fake_update(x0, batch["text"], SampleRNG(0, 1, ["a", "b"]), "next")
    b = other.fake_update(x0, batch["text"], SampleRNG(0, 1, ["a", "b"]), "next")
    assert a == b
    assert all(torch.equal(p, q) for p, q in zip(loss.fake_params, other.fake_params))
    with pytest.raises(DistilleryError, match="fake"):
        DMDLoss(fake_rank=2).load_state_dict(saved)  # not set up
    smaller = _setup(DMDLoss(fake_rank=2), AAADiT(**tiny_config(width=32, num_blocks=1, latent_channels=4)))
    with pytest.raises(DistilleryError, match="fake_rank"):
        smaller.load_state_dict(saved)


def test_regression_term_adds_direct_distill_on_teacher_pairs():
    dit = _student()
    loss = _setup(DMDLoss(steps=2, teacher_cfg=1.0, regression_weight=0.5), dit)
    batch = dict(_batch(b=2), seed=[3, 4], rand_device=["cpu", "cpu"], cfg_scale=[None, None],
                 target_latents=torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2)))
    rng = SampleRNG(0, 0, ["a", "b"])
    value, logs = loss(dit, batch, rng)
    direct, _ = DirectDistillLoss(steps=2, target="latents")(dit, batch, rng)
    assert logs["dmd"] == 0.0 and value.item() == pytest.approx(0.5 * direct.item(), rel=1e-5)
    assert "regression" not in loss(dit, _batch(b=2), rng)[1]  # no teacher latents: no term


def test_settings_round_trip_and_refusals():
    loss = DMDLoss(steps=1, teacher_cfg=3.5, fake_updates=4, fake_rank=8, fake_targets=["to_q", "to_v"],
                   regression_weight=0.25, mu=1.2)
    assert loss_from_dict(loss.to_dict()) == loss and loss.to_dict()["kind"] == "dmd"
    from dit_distillery.trainer import DataSpec, TrainJob

    TrainJob(data=DataSpec(synthetic={}), loss=loss.to_dict()).validate()
    for bad, field in (({"fake_updates": -1}, "fake_updates"), ({"min_sigma": 0.9, "max_sigma": 0.1}, "min_sigma"),
                       ({"teacher_cfg": 0}, "teacher_cfg"), ({"steps": 0}, "steps"), ({"fake_rank": 0}, "fake_rank"),
                       ({"nonsense": 1}, "nonsense")):
        with pytest.raises(DistilleryError, match=field):
            loss_from_dict({"kind": "dmd", **bad})
    with pytest.raises(DistilleryError, match="fake_rank"):
        TrainJob(data=DataSpec(synthetic={}), loss={"kind": "dmd", "fake_rank": "8"}).validate()
    with pytest.raises(DistilleryError, match="set up"):
        DMDLoss()(_student(), _batch(), SampleRNG(0, 0, ["a", "b"]))
    with pytest.raises(DistilleryError, match="fake_targets"):
        _setup(DMDLoss(fake_targets=["no_such_layer"]), _student())
