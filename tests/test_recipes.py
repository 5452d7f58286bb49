"""The recipes (`python -m dit_distillery recipe ...`, dit_distillery/recipes.py) end to end on the tiny built-in
families: the teacher really is base + the user's LoRA, the student's job merges the user's LoRA into the turbo
DiT (or into a student base with the turbo LoRA baked in), a rerun resumes every stage, and bad input is refused
before anything is written. Tiny step counts at 32x32: seconds."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from dit_distillery.cli import main
from dit_distillery.data import read_metadata
from dit_distillery.errors import DistilleryError
from dit_distillery.lora import add_lora, merge_lora, read_lora, save_lora
from dit_distillery.models.registry import load_dit, save_dit
from dit_distillery.pipelines.loading import load_pipeline
from dit_distillery.recipes import Inputs, RecipeSettings, run_recipe
from dit_distillery.student import load_student

FAST = ["--synthetic-prompts", "2", "--teacher-steps", "3", "--student-steps", "2", "--train-steps", "2",
        "--save-every", "0", "--rank", "2", "--device", "cpu", "--json"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _files(folder, family: str):
    """A "turbo" DiT (the tiny base, perturbed) and a random LoRA on the family's preset layers."""
    pipe = load_pipeline(f"tiny:{family}")
    turbo = copy.deepcopy(pipe.dit)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in turbo.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    adapted = copy.deepcopy(pipe.dit)
    add_lora(adapted, pipe.family_spec.default_lora_preset, rank=2)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return save_dit(turbo, folder / "turbo.safetensors"), save_lora(adapted, folder / "style.safetensors")


def _run(argv, capsys) -> dict:
    code = main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    return json.loads(out[-1])


def _first_row_latents(data_dir):
    row = read_metadata(data_dir).rows[0]
    (latents,) = load_file(str(row.latents)).values()
    return row, latents


def test_keep_lora_few_step_cli_end_to_end_and_resume(tmp_path, capsys):
    turbo, lora = _files(tmp_path, "z_image")
    argv = ["recipe", "keep-lora-few-step", "--family", "z_image", "--base", "tiny:z_image", "--turbo", str(turbo),
            "--lora", str(lora), "--out", str(tmp_path / "run"), *FAST]
    report = _run(argv, capsys)
    assert report["family"] == "z_image" and report["size"] == [32, 32]
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["model"] == {**job["model"], "pipeline": "tiny:z_image", "dit": str(turbo)}
    assert (job["lora"]["preset"], job["lora"]["preset_strength"], job["lora"]["rank"]) == (str(lora), 1.0, 2)
    assert job["loss"]["kind"] == "direct_distill" and job["validation"]["teacher"] is False
    # the teacher is the base with the user's LoRA, 3 steps CFG 4; the rows ask the student for 2 steps CFG 1
    row, latents = _first_row_latents(tmp_path / "run" / "teacher_data")
    assert (row.num_inference_steps, row.cfg_scale) == (2, 1.0)
    teacher = load_student(load_pipeline("tiny:z_image"), lora=str(lora))
    again = teacher.sample(row.prompt, seeds=row.seed, steps=3, cfg_scale=4.0, height=32, width=32, output="latent")
    plain = load_pipeline("tiny:z_image").sample(row.prompt, seeds=row.seed, steps=3, cfg_scale=4.0, height=32,
                                                 width=32, output="latent")
    assert torch.allclose(again.latents[0], latents, atol=1e-5)
    assert not torch.allclose(plain.latents[0], latents, atol=1e-3)  # the LoRA is not a no-op
    weights = tmp_path / "run" / "train" / "repair_lora.safetensors"
    assert report["weights"] == str(weights) and read_lora(weights).modules
    before = load_file(str(weights))
    # a rerun reuses the dataset (no teacher is loaded) and the finished training
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0 and "reusing" in captured.err and "resumed" in captured.err
    assert all(torch.equal(v, load_file(str(weights))[k]) for k, v in before.items())


def test_turbo_lora_is_baked_into_the_student_base(tmp_path):
    """Qwen-Image + Lightning: the turbo LoRA is merged into a student DiT file; the user's LoRA stays the job's."""
    _, lora = _files(tmp_path, "z_image")
    turbo_lora = tmp_path / "lightning.safetensors"
    turbo_lora.write_bytes(lora.read_bytes())
    settings = dict(prompts=["a red circle on a blue background"], teacher_steps=3, student_steps=2, train_steps=1,
                    rank=2, save_every=0, student_schedule="Qwen-Image-Lightning")
    inputs = Inputs(base="tiny:z_image", turbo_lora=str(turbo_lora), turbo_lora_strength=0.5, lora=str(lora))
    report = run_recipe(tmp_path / "run", inputs, RecipeSettings(**settings), until="data", log=lambda _: None)
    assert not (tmp_path / "run" / "train").exists()  # --until data
    student = load_dit(report["student_dit"])
    expected = load_pipeline("tiny:z_image").dit
    merge_lora(expected, read_lora(turbo_lora), 0.5)
    assert all(torch.allclose(v, student.state_dict()[k]) for k, v in expected.state_dict().items())
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["model"]["dit"] == report["student_dit"] and job["lora"]["preset"] == str(lora)
    assert job["loss"]["template"] == "Qwen-Image-Lightning"
    # the same folder with another merge is refused, the file kept
    other = Inputs(base="tiny:z_image", turbo_lora=str(turbo_lora), turbo_lora_strength=1.0, lora=str(lora))
    with pytest.raises(DistilleryError, match="other files"):
        run_recipe(tmp_path / "run", other, RecipeSettings(**settings), until="data", log=lambda _: None)


def test_distill_klein_recipe_on_tiny_flux2(tmp_path, capsys):
    report = _run(["recipe", "distill-klein", "--base", "tiny:flux2", "--out", str(tmp_path / "run"),
                   "--synthetic-prompts", "2", "--teacher-steps", "5", "--train-steps", "2", "--save-every", "0",
                   "--rank", "2", "--device", "cpu", "--json"], capsys)
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert report["family"] == "flux2" and job["model"]["dit"] is None and job["lora"]["preset"] is None
    # the teacher is the job's own base: validation shows it beside the student, at the recipe's teacher settings
    v = job["validation"]
    assert (v["teacher"], v["teacher_steps"], v["teacher_cfg"], job["model"]["teacher"]) == (True, 5, 4.0, None)
    assert (tmp_path / "run" / "train" / "validation" / "teacher" / "000.png").is_file()
    row, _ = _first_row_latents(tmp_path / "run" / "teacher_data")
    assert (row.num_inference_steps, row.cfg_scale) == (4, 1.0)  # the recipe's default: 4 steps, CFG 1
    assert read_lora(report["weights"]).modules


@pytest.mark.parametrize("extra, field", [
    (["keep-lora-few-step", "--turbo", "T"], "lora"),
    (["keep-lora-few-step", "--lora", "L"], "turbo"),
    (["keep-lora-few-step", "--lora", "L", "--turbo", "T", "--family", "flux2"], "family"),
    (["keep-lora-few-step", "--lora", "L", "--turbo", "KLEIN"], "turbo"),
    (["keep-lora-few-step", "--lora", "missing.safetensors", "--turbo", "T"], "lora"),
    (["distill-klein", "--lora", "L"], "lora"),
    (["distill-klein", "--student-schedule", "no-such-schedule"], "student_schedule"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, extra, field):
    turbo, lora = _files(tmp_path, "z_image")
    klein = save_dit(load_pipeline("tiny:flux2").dit, tmp_path / "klein.safetensors")
    names = {"T": str(turbo), "L": str(lora), "KLEIN": str(klein)}
    argv = ["recipe", *[names.get(a, a) for a in extra], "--base", "tiny:z_image", "--out", str(tmp_path / "run"),
            *FAST]
    assert main(argv) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]["field"] == field
    assert not (tmp_path / "run").exists()


def test_the_teacher_column_only_where_the_job_can_name_the_teacher(tmp_path):
    from dit_distillery.recipes import _teacher_dit

    folder = tmp_path / "base"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    assert _teacher_dit(Inputs(base="tiny:flux2"), None) == (None, True)  # the job's own base
    assert _teacher_dit(Inputs(base="b", base_dit="base.safetensors", turbo="t"), "t") == ("base.safetensors", True)
    assert _teacher_dit(Inputs(base=str(folder), turbo="t"), "t") == (str(folder / "transformer"), True)
    assert _teacher_dit(Inputs(base="tiny:z_image", turbo="t"), "t") == (None, False)  # a built-in DiT: no file
    assert _teacher_dit(Inputs(base="tiny:z_image", turbo="t", lora="l"), "t") == (None, False)  # base + LoRA
