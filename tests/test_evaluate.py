"""Evaluate Student (dit_distillery/evaluate.py, the `evaluate` command, the node): metrics on constructed cases,
the whole evaluation on tiny pipelines (teacher sampled or read from a Generate Distill Dataset folder), and the
refusals naming their field."""

import copy
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dit_distillery import evaluate as ev
from dit_distillery.errors import DistilleryError
from tests.test_nodes_common import no_comfy  # noqa: F401 (fixture)


# ----------------------------------------------------------------------------------------------------------
# Metrics on constructed cases

def test_identical_images_psnr_inf_ssim_one_mse_zero():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.isinf(ev.psnr(x, x.clone())).all()
    assert torch.allclose(ev.ssim(x, x.clone()), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.equal(ev.latent_mse(x, x.clone()), torch.zeros(3, dtype=torch.float64))


def test_known_noise_gives_known_psnr_and_mse():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    sign = torch.where(torch.rand_like(x) < 0.5, -1.0, 1.0)
    y = x + 0.1 * sign  # squared error exactly 0.01 everywhere
    assert torch.allclose(ev.latent_mse(x, y), torch.full((2,), 0.01, dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(ev.psnr(x, y), torch.full((2,), 10 * math.log10(4 / 0.01), dtype=torch.float64), atol=1e-4)
    assert torch.allclose(ev.psnr(x, y, data_range=1.0), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-4)


def test_ssim_of_flat_images_is_the_luminance_term():
    a, b = torch.full((1, 3, 12, 12), 0.2), torch.full((1, 3, 12, 12), -0.4)
    c1 = (0.01 * 2) ** 2
    want = (2 * 0.2 * -0.4 + c1) / (0.2 ** 2 + 0.4 ** 2 + c1)
    assert float(ev.ssim(a, b)) == pytest.approx(want, rel=1e-6)


def _ssim_brute_force(x: np.ndarray, y: np.ndarray, size: int = 11) -> float:
    """SSIM straight from Wang et al.'s definition: a Gaussian-weighted window at every valid position."""
    sigma, L = 1.5, 2.0
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-r ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                px, py = x[c, i:i + size, j:j + size], y[c, i:i + size, j:j + size]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_definition_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 16, 14, generator=g) * 2 - 1
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    got = float(ev.ssim(x, noisy))
    assert got == pytest.approx(_ssim_brute_force(x[0].double().numpy(), noisy[0].double().numpy()), rel=1e-9)
    noisier = (x + 0.8 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert float(ev.ssim(x, noisier)) < got < 1
    assert float(ev.ssim(noisy, x)) == pytest.approx(got)  # symmetric


def test_ssim_of_images_smaller_than_the_window():
    x = torch.rand(1, 3, 6, 8) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape)).clamp(-1, 1)
    assert float(ev.ssim(x, x)) == pytest.approx(1.0)
    # the window shrinks to the largest odd size that fits (5)
    assert float(ev.ssim(x, y)) == pytest.approx(_ssim_brute_force(x[0].double().numpy(), y[0].double().numpy(), 5),
                                                 rel=1e-9)


def test_diversity_zero_for_identical_samples_and_the_rms_distance_otherwise():
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert ev.diversity(x.repeat(3, 1, 1, 1), ["p"] * 3) == 0.0
    pair = torch.cat([x, x + 0.5])
    assert ev.diversity(pair, ["p", "p"]) == pytest.approx(0.5)
    # two prompts count once each; a prompt with one seed is left out
    four = torch.cat([x, x + 0.5, x, x + 0.1, x])
    assert ev.diversity(four, ["a", "a", "b", "b", "c"]) == pytest.approx((0.5 + 0.1) / 2)
    assert ev.diversity(four, list("abcde")) is None


def test_mismatched_shapes_are_refused_by_name():
    with pytest.raises(DistilleryError) as err:
        ev.latent_mse(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 2))
    assert err.value.field == "latents"
    with pytest.raises(DistilleryError) as err:
        ev.ssim(torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    assert err.value.field == "images"


def test_synthetic_accuracy_reads_drawn_shapes():
    from dit_distillery.data.synthetic import generate_samples

    samples = generate_samples(4, seed=3)
    prompts = [s.prompt for s in samples]
    assert ev.is_synthetic(prompts) and not ev.is_synthetic(prompts + ["a photo of a cat"])
    assert ev.colour_shape_accuracy([s.image for s in samples], prompts)["all"] == 1.0


def test_held_out_pairs_number_seeds_like_gen_dataset():
    prompts, seeds = ev.held_out_pairs(["a", "b"], 2, 100)
    assert prompts == ["a", "a", "b", "b"] and seeds == [100, 101, 102, 103]
    with pytest.raises(DistilleryError) as err:
        ev.held_out_pairs(["a"], 0)
    assert err.value.field == "seeds_per_prompt"


def test_cli_default_seed_is_the_core_one():
    from dit_distillery.commands import evaluate as cmd

    assert cmd.HELD_OUT_START_SEED == ev.HELD_OUT_START_SEED


# ----------------------------------------------------------------------------------------------------------
# The evaluation on tiny pipelines

@pytest.fixture(scope="module")
def base():
    from dit_distillery.pipelines.loading import load_pipeline

    return load_pipeline("tiny:aaadit")


@pytest.fixture(scope="module")
def student(base):
    dit = copy.deepcopy(base.dit)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in dit.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return base.with_dit(dit)


PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
FAST = dict(steps=2, teacher_steps=3, teacher_cfg=2.0)


def test_the_teacher_against_itself_scores_perfectly(base):
    prompts, seeds = ev.held_out_pairs(PROMPTS, 2)
    result = ev.evaluate_student(base, teacher=base, prompts=prompts, seeds=seeds, steps=3, cfg=2.0,
                                 teacher_steps=3, teacher_cfg=2.0)
    s = result.metrics["student"]
    assert s["latent_mse"] == 0 and s["psnr_db"] is None and s["identical_images"] == 4
    assert s["ssim"] == pytest.approx(1.0)
    assert s["diversity"] == pytest.approx(result.metrics["teacher"]["diversity"]) and s["diversity"] > 0
    assert result.metrics["ratios"]["diversity_vs_teacher"] == pytest.approx(1.0)
    assert "inf" in result.table


def test_student_baseline_teacher_metrics_table_and_grid(base, student, tmp_path):
    prompts, seeds = ev.held_out_pairs(PROMPTS, 2)
    calls = []
    result = ev.evaluate_student(student, teacher=base, baseline=base, prompts=prompts, seeds=seeds, grid_rows=3,
                                 batch_size=2, progress=lambda done, total: calls.append((done, total)), **FAST)
    m = result.metrics
    assert m["pairs"] == 4 and m["prompts"] == 2 and m["size"] == [32, 32]
    for key in ("baseline", "student"):
        assert m[key]["steps"] == 2 and m[key]["cfg"] == 1.0 and m[key]["latent_mse"] > 0
        assert 0 < m[key]["ssim"] < 1 and m[key]["psnr_db"] > 0 and m[key]["images_per_s"] > 0
        assert set(m[key]["accuracy"]) == {"colour", "shape", "background", "all"}
    assert m["teacher"]["steps"] == 3 and m["teacher"]["images_per_s"] > 0
    r = m["ratios"]
    assert r["mse_vs_baseline"] == pytest.approx(m["student"]["latent_mse"] / m["baseline"]["latent_mse"])
    assert r["diversity_vs_teacher"] == pytest.approx(m["student"]["diversity"] / m["teacher"]["diversity"])
    assert r["speedup_vs_teacher"] == pytest.approx(m["student"]["images_per_s"] / m["teacher"]["images_per_s"])
    assert m["clip_model"] is None and any("CLIP" in n for n in m["notes"]) and any("LPIPS" in n for n in m["notes"])
    assert calls[-1][0] == calls[-1][1] == 4 * (3 + 2 + 2)  # image-steps, over 2 batches per run
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) > 6
    assert "undistilled" in result.table and "student / undistilled latent MSE" in result.table
    json.dumps(m, allow_nan=False)  # strict JSON: no inf/nan
    assert result.grid.size[0] > 3 * 128 and result.grid.size[1] > 3 * 128  # 3 columns x 3 rows of 128 px cells
    paths = result.save(tmp_path / "out")
    assert json.loads(open(paths["json"]).read())["student"]["latent_mse"] == m["student"]["latent_mse"]
    assert Image.open(paths["grid"]).size == result.grid.size


def test_a_teacher_dataset_is_reused_instead_of_resampled(base, student, tmp_path):
    from dit_distillery.gen_dataset import generate_distill_dataset

    generate_distill_dataset(base, PROMPTS, tmp_path / "held_out", seeds_per_prompt=2, start_seed=500,
                             teacher_steps=3, teacher_cfg=2.0, student_steps=2, student_cfg=1.0)
    from_folder = ev.evaluate_student(student, teacher_dataset=tmp_path / "held_out", baseline=base)
    prompts, seeds = ev.held_out_pairs(PROMPTS, 2, 500)
    sampled = ev.evaluate_student(student, teacher=base, baseline=base, prompts=prompts, seeds=seeds, **FAST)
    a, b = from_folder.metrics, sampled.metrics
    assert a["student"]["steps"] == 2 and a["teacher"]["steps"] == 3  # the folder's settings
    assert a["teacher"]["source"].startswith("dataset")
    assert a["student"]["latent_mse"] == pytest.approx(b["student"]["latent_mse"], rel=1e-6)
    assert a["baseline"]["ssim"] == pytest.approx(b["baseline"]["ssim"], rel=1e-6)
    assert a["teacher"]["images_per_s"] > 0 and any("baseline's at the teacher's" in n for n in a["notes"])
    assert ev.evaluate_student(student, teacher_dataset=tmp_path / "held_out", max_pairs=2).metrics["pairs"] == 2


@pytest.mark.parametrize("kwargs, field", [
    (dict(), "teacher"),
    (dict(teacher=True, teacher_dataset="x"), "teacher_dataset"),
    (dict(teacher_dataset="x", prompts=PROMPTS), "prompts"),
    (dict(teacher=True, prompts=[]), "prompts"),
    (dict(teacher=True, prompts=PROMPTS, seeds=[1]), "seeds"),
    (dict(teacher=True, prompts=PROMPTS, steps=0), "steps"),
    (dict(teacher=True, prompts=PROMPTS, cfg=-1.0), "cfg"),
    (dict(teacher=True, prompts=PROMPTS, teacher_steps=0), "teacher_steps"),
    (dict(teacher=True, prompts=PROMPTS, grid_rows=0), "grid_rows"),
    (dict(teacher=True, prompts=PROMPTS, width=30), "size"),
])
def test_bad_inputs_name_their_field(base, kwargs, field):
    if kwargs.get("teacher") is True:
        kwargs["teacher"] = base
    with pytest.raises(DistilleryError) as err:
        ev.evaluate_student(base, **kwargs)
    assert err.value.field == field


def test_bad_teacher_dataset_and_clip_folders_are_refused(base, tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DistilleryError) as err:
        ev.evaluate_student(base, teacher_dataset=tmp_path / "plain")
    assert err.value.field == "teacher_dataset" and "gen_dataset.json" in str(err.value)
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    with pytest.raises(DistilleryError) as err:
        ev.evaluate_student(base, teacher=base, prompts=PROMPTS, clip_model=tmp_path / "clip")
    assert err.value.field == "clip_model" and "safetensors" in str(err.value)


def _tiny_clip(folder):
    """A random CLIPModel saved as a local folder (safetensors), with the tiny tokenizer and an image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dit_distillery.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_score_from_a_local_folder(base, tmp_path):
    folder = _tiny_clip(tmp_path / "clip")
    scorer = ev.ClipScorer.load(folder)
    images = [Image.new("RGB", (32, 32), c) for c in ((200, 0, 0), (0, 0, 200))]
    score = scorer.score(images, PROMPTS)
    assert 0 <= score <= 100 and score == scorer.score(images, PROMPTS)
    result = ev.evaluate_student(base, teacher=base, prompts=PROMPTS, clip_model=folder, **FAST)
    assert all(0 <= result.metrics[k]["clip_score"] <= 100 for k in ("teacher", "student"))
    assert "CLIP" in result.table and not any("CLIP score skipped" in n for n in result.metrics["notes"])


# ----------------------------------------------------------------------------------------------------------
# The command

def test_cli_writes_json_and_png(base, student, tmp_path, capsys):
    from dit_distillery.cli import main
    from dit_distillery.models.registry import save_dit

    weights = save_dit(student.dit, tmp_path / "student.safetensors")
    out = tmp_path / "eval"
    code = main(["evaluate", "--base", "tiny:aaadit", "--weights", str(weights), "--synthetic-prompts", "2",
                 "--steps", "2", "--teacher-steps", "3", "--teacher-cfg", "2", "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads((out / "evaluation.json").read_text())
    assert report["student"]["latent_mse"] == written["student"]["latent_mse"] > 0
    assert written["baseline"]["steps"] == 2 and written["teacher"]["steps"] == 3 and written["pairs"] == 4
    assert "accuracy" in written["student"]  # synthetic prompts: the classifier's accuracy
    assert Image.open(out / "grid.png").size[0] > 3 * 128
    assert "student" in (out / "evaluation.txt").read_text()


@pytest.mark.parametrize("argv, field", [
    (["--teacher-dataset", "{tmp}", "--prompt", "a cat"], "--prompt"),
    (["--prompt", "a", "--synthetic-prompts", "2"], "--prompt"),
    (["--synthetic-prompts", "2", "--lora", "{tmp}/missing.safetensors"], "--lora"),
    (["--synthetic-prompts", "2", "--no-baseline", "--baseline", "tiny"], "--no-baseline"),
])
def test_cli_refuses_before_loading_anything(tmp_path, capsys, argv, field):
    from dit_distillery.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--out", str(out)] + [a.format(tmp=tmp_path) for a in argv]) == 2
    assert field.lstrip("-").replace("-", "_") in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------------------------------------
# The node

def test_node_returns_table_grid_and_json(no_comfy, tmp_path):
    from dit_distillery.models.registry import save_dit
    from dit_distillery.tiny import tiny_pipeline
    from tests.test_nodes_common import call, load_pack

    refs = sys.modules[load_pack().__name__ + ".nodes.refs"]
    base_ref = refs.PipelineRef(source="tiny:aaadit")
    dit = tiny_pipeline("aaadit", seed=1).dit
    student_ref = base_ref.with_dit(str(save_dit(dit, tmp_path / "student.safetensors")))
    table, grid, report = call("DD_EvaluateStudent", student=student_ref, synthetic_prompts=2, steps=2,
                               teacher_steps=3, teacher_cfg=2.0, grid_rows=2)
    metrics = json.loads(report)
    assert isinstance(table, str) and "undistilled" in table and metrics["baseline"]["steps"] == 2
    assert grid.dim() == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3 and 0 <= grid.min() <= grid.max() <= 1
    with pytest.raises(DistilleryError) as err:  # not derived from a base: no default teacher
        call("DD_EvaluateStudent", student=base_ref, synthetic_prompts=2)
    assert err.value.field == "teacher"
    with pytest.raises(DistilleryError) as err:
        call("DD_EvaluateStudent", student=student_ref, teacher_dataset=refs.DatasetRef({"path": str(tmp_path / "no")}))
    assert err.value.field == "teacher_dataset"
