"""Trajectory imitation: interpolation of the recorded path, zero loss when the student reproduces it, the image
term, and Generate Distill Dataset's `record_trajectory` read back through the cache into the loss."""

from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from dit_distillery import tiny
from dit_distillery.conditioning import TextEmbeds
from dit_distillery.errors import DistilleryError
from dit_distillery.losses import SampleRNG, TrajectoryLoss, loss_from_dict
from dit_distillery.losses_trajectory import trajectory_at
from dit_distillery.models.aaadit import AAADiT, tiny_config
from dit_distillery.sampling import euler_denoise
from dit_distillery.velocity import predict_velocity


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dit(seed=0):
    torch.manual_seed(seed)
    return AAADiT(**tiny_config(width=32, num_blocks=1, latent_channels=4))


def _own_path(dit, steps, b=2, midpoints=False):
    """A batch whose 'teacher' trajectory is the student's own Euler path at its sigmas (optionally also at the
    midpoint of every step, where the Euler path is the straight chord)."""
    g = torch.Generator().manual_seed(1)
    text = TextEmbeds(torch.randn(b, 5, 32, generator=g), None)
    c = dit.config.latent_channels
    noise = torch.randn(b, c, 4, 4, generator=g)
    loss = TrajectoryLoss(steps=steps)
    grid = loss._distill().student_sigmas("aaadit", steps, noise)
    states = []
    with torch.no_grad():
        final = euler_denoise(partial(predict_velocity, dit), noise, grid, text, states=lambda i, x: states.append(x))
    sigmas, path = list(grid), list(states)
    if midpoints:
        ends = states[1:] + [final]
        sigmas = [v for s, n in zip(grid, grid[1:] + [0.0]) for v in (s, (s + n) / 2)]
        path = [v for a, e in zip(states, ends) for v in (a, (a + e) / 2)]
    batch = {"latents": torch.zeros(b, c, 4, 4), "text": text, "target_latents": final,
             "trajectory": torch.stack(path, dim=1), "trajectory_sigmas": torch.tensor([sigmas] * b),
             "num_inference_steps": [None] * b, "cfg_scale": [None] * b, "where": ["r0", "r1"][:b]}
    return loss, batch


def test_trajectory_at_interpolates_and_refuses_above_the_record():
    path = torch.tensor([[4.0], [2.0]])          # at sigmas 1.0 and 0.5, final 0.0 at sigma 0
    sigmas, final = torch.tensor([1.0, 0.5]), torch.tensor([0.0])
    assert [float(trajectory_at(path, sigmas, final, s)) for s in (1.0, 0.75, 0.5, 0.25, 0.0)] == [4, 3, 2, 1, 0]
    with pytest.raises(DistilleryError, match="above the recorded trajectory"):
        trajectory_at(path[1:], sigmas[1:], final, 0.9)


@pytest.mark.parametrize("steps,midpoints", [(1, False), (2, True), (4, False), (4, True)])
def test_zero_when_the_student_reproduces_the_trajectory(steps, midpoints):
    dit = _dit()
    loss, batch = _own_path(dit, steps, midpoints=midpoints)
    value, logs = loss(dit, batch, SampleRNG(0, 0, ["a", "b"]))
    assert value.item() < 1e-10 and logs["groups"] == 1
    other, _ = loss(_dit(seed=1), batch, SampleRNG(0, 0, ["a", "b"]))  # another student: off the path
    assert other.item() > 1e-3
    other.backward()


def test_diffsynth_weighting_and_image_term():
    dit = _dit()
    loss, batch = _own_path(dit, 2)
    weighted, _ = TrajectoryLoss(steps=2, weighting="diffsynth")(_dit(seed=1), batch, SampleRNG(0, 0, ["a", "b"]))
    plain, _ = TrajectoryLoss(steps=2)(_dit(seed=1), batch, SampleRNG(0, 0, ["a", "b"]))
    assert weighted.item() != pytest.approx(plain.item()) and weighted.item() > 0

    image = TrajectoryLoss(steps=2, image_weight=0.5)
    with pytest.raises(DistilleryError, match="codec"):
        image(dit, batch, SampleRNG(0, 0, ["a", "b"]))
    pipe = tiny.tiny_pipeline("aaadit", seed=0)
    image.setup(type("Ctx", (), {"pipe": pipe})())
    student = pipe.dit
    loss, batch = _own_path(student, 2)
    value, logs = image(student, batch, SampleRNG(0, 0, ["a", "b"]))
    assert value.item() < 1e-8 and logs["image"] < 1e-8  # its own sample decodes to its own image
    shifted = dict(batch, target_latents=batch["target_latents"] + 0.5)
    value, logs = image(student, shifted, SampleRNG(0, 0, ["a", "b"]))
    assert logs["image"] > 0 and value.item() == pytest.approx(logs["trajectory"] + 0.5 * logs["image"], rel=1e-5)
    value.backward()


def test_settings_round_trip_and_refusals():
    loss = TrajectoryLoss(steps=4, cfg=1.0, weighting="diffsynth", image_weight=0.1, mu="diffsynth")
    assert loss_from_dict(loss.to_dict()) == loss and loss.to_dict()["kind"] == "trajectory"
    from dit_distillery.trainer import DataSpec, TrainJob

    TrainJob(data=DataSpec(synthetic={}), loss=loss.to_dict()).validate()
    for bad, field in (({"weighting": "x"}, "weighting"), ({"image_weight": -1}, "image_weight"),
                       ({"steps": 0}, "steps"), ({"mu": "x"}, "mu")):
        with pytest.raises(DistilleryError, match=field):
            loss_from_dict({"kind": "trajectory", **bad})
    with pytest.raises(DistilleryError, match="record_trajectory"):
        TrajectoryLoss()(_dit(), {"latents": torch.zeros(1, 4, 4, 4), "target_latents": torch.zeros(1, 4, 4, 4),
                                  "text": TextEmbeds(torch.zeros(1, 5, 32), None), "where": ["r0"]}, None)


def test_gen_dataset_records_the_trajectory_and_the_teacher_matches_it(tmp_path):
    """Rows made with the student's settings == the teacher's and every step recorded: the teacher, as its own
    student, is on its trajectory. The folder's metadata.csv is unchanged by the option."""
    from dit_distillery.data import CachedDataset, Resolution, build_cache, collate, read_metadata
    from dit_distillery.gen_dataset import COLUMNS, generate_distill_dataset

    pipe = tiny.tiny_pipeline("qwen_image", seed=0)
    out = tmp_path / "ds"
    with pytest.raises(DistilleryError, match="record_trajectory"):
        generate_distill_dataset(pipe, ["a red circle"], out, teacher_steps=3, record_trajectory=4, height=32,
                                 width=32)
    generate_distill_dataset(pipe, ["a red circle", "a blue square"], out, teacher_steps=3, teacher_cfg=1.0,
                             student_steps=3, student_cfg=1.0, height=32, width=32, record_trajectory=3)
    assert (out / "metadata.csv").read_text().splitlines()[0].split(",") == list(COLUMNS)
    rows = read_metadata(out).rows
    stored = load_file(str(rows[0].latents))
    sigmas = pipe.sigmas(3, 32, 32)
    assert stored["trajectory"].shape == (3, *stored["latents"].shape)
    assert stored["trajectory_sigmas"].tolist() == pytest.approx(sigmas)
    noise = pipe.initial_noise([rows[0].seed], 32, 32, "cpu")[0].float()
    assert torch.equal(stored["trajectory"][0], noise)  # the first point is the row's noise

    cache, _ = build_cache(rows, tmp_path / "cache", pipe.codec, pipe.prompt_encoder,
                           Resolution(32, 32, factor=pipe.size_multiple))
    data = CachedDataset(rows, cache)
    batch = collate([data[i] for i in range(len(data))])
    assert torch.equal(batch["trajectory"][0], stored["trajectory"])
    with torch.no_grad():
        value, _ = TrajectoryLoss()(pipe.dit, batch, SampleRNG(0, 0, [0, 1]))
        shifted = dict(batch, trajectory=batch["trajectory"] + 0.1)
        other, _ = TrajectoryLoss()(pipe.dit, shifted, SampleRNG(0, 0, [0, 1]))
    assert value.item() < 1e-9 and other.item() > 1e-4


def test_cli_records_the_trajectory(tmp_path, capsys):
    from dit_distillery.cli import main
    from dit_distillery.data import read_metadata

    out = tmp_path / "ds"
    assert main(["gen-dataset", "--pipeline", "tiny:aaadit", "--prompts", "a red circle", "--out", str(out),
                 "--teacher-steps", "4", "--height", "32", "--width", "32", "--record-trajectory", "2",
                 "--json"]) == 0
    stored = load_file(str(read_metadata(out).rows[0].latents))
    assert stored["trajectory"].shape[0] == 2 and stored["trajectory_sigmas"][0] == 1.0
