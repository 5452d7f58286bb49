"""Generate Distill Dataset: read-back through our reader and cache, exact teacher targets, resume, interruption,
settings guard, bad input, CLI. Tiny random pipelines at 32x32 with a few steps: seconds in all."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dit_distillery import tiny
from dit_distillery.cli import main
from dit_distillery.data import Resolution, build_cache, read_metadata
from dit_distillery.data.synthetic import parse_caption, write_dataset
from dit_distillery.errors import DistilleryError, StopRequested
from dit_distillery.gen_dataset import (COLUMNS, METADATA_NAME, SETTINGS_NAME, generate_distill_dataset,
                                        read_prompts, row_name, seed_for, synthetic_prompts)
from dit_distillery.pipelines import to_pil

PROMPTS = ["a red circle on a blue background", "a green square on a white background", "一只蓝色的猫"]
FAST = dict(teacher_steps=3, teacher_cfg=3.0, height=32, width=32, negative_prompt="blurry")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread avoids oversubscribing the shared CPU (2 threads ran 5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return tiny.tiny_pipeline("qwen_image", seed=0)


def pixels(path) -> bytes:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.convert("RGB").tobytes()


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# Prompts and seeds

def test_read_prompts_file_text_and_list(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# a comment\n\n  a red circle  \n一只猫\n   # indented comment\nlast\n", encoding="utf-8")
    assert read_prompts(f) == read_prompts(str(f)) == ["a red circle", "一只猫", "last"]
    assert read_prompts("one\n\ntwo") == ["one", "two"]
    assert read_prompts("just one prompt") == ["just one prompt"]
    assert read_prompts(["x", "y"]) == ["x", "y"]
    for bad in ([], ["ok", "  "], ["ok", 3], "# only a comment\n\n", str(tmp_path / "missing.txt")):
        with pytest.raises(DistilleryError, match="prompts"):
            read_prompts(bad)


def test_synthetic_prompts_are_reproducible_captions():
    a = synthetic_prompts(300, seed=1)
    assert a == synthetic_prompts(300, seed=1) and a != synthetic_prompts(300, seed=2)
    assert all(parse_caption(p) is not None for p in a)
    assert len(set(a[:280])) == 280  # every (shape, colour, background) once before any repeats
    with pytest.raises(DistilleryError):
        synthetic_prompts(0)


def test_seed_rule_and_names():
    seeds = [seed_for(p, k, start_seed=10, seeds_per_prompt=3) for p in range(4) for k in range(3)]
    assert seeds == list(range(10, 22))
    assert row_name("A red circle!", 7).startswith("7-a_red_circle-")
    assert row_name("一只猫", 7) != row_name("一只狗", 7) and row_name("一只猫", 7) != row_name("一只猫", 8)


# ----------------------------------------------------------------------------------------------------------
# The dataset

def test_dataset_reads_back_and_feeds_the_cache(pipe, tmp_path):
    out = tmp_path / "ds"
    seen = []
    report = generate_distill_dataset(pipe, PROMPTS, out, seeds_per_prompt=2, start_seed=5, batch_size=4,
                                      student_steps=4, student_cfg=1.0, progress=lambda d, t: seen.append((d, t)),
                                      **FAST)
    assert report["rows_written"] == report["total"] == 6 and report["rows_skipped"] == 0
    assert report["images_per_second"] > 0 and report["metadata"] == str(out / METADATA_NAME)
    assert seen == [(0, 6), (4, 6), (6, 6)]  # at the start, then after each batch

    header = (out / METADATA_NAME).read_text(encoding="utf-8").splitlines()[0]
    assert header.split(",") == list(COLUMNS)  # DiffSynth's six columns first, ours after
    meta = read_metadata(out, validate=True)
    assert [(r.prompt, r.seed) for r in meta] == [(p, 5 + 2 * i + k) for i, p in enumerate(PROMPTS) for k in range(2)]
    for r in meta:
        assert (r.rand_device, r.num_inference_steps, r.cfg_scale, r.teacher_steps, r.teacher_cfg) == ("cpu", 4, 1.0, 3, 3.0)
        assert isinstance(r.seed, int) and isinstance(r.num_inference_steps, int) and isinstance(r.cfg_scale, float)
        assert r.image.parent == out / "images" and r.latents.parent == out / "latents" and not r.extra
    settings = json.loads((out / SETTINGS_NAME).read_text())
    assert settings["teacher_steps"] == 3 and settings["negative_prompt"] == "blurry"
    assert settings["sigmas"] == pipe.sigmas(3, 32, 32)

    cache, cache_report = build_cache(meta.rows, tmp_path / "cache", pipe.codec, pipe.prompt_encoder,
                                      Resolution(32, 32, factor=pipe.size_multiple))
    assert cache_report.encoded == 6 and cache_report.rescaled == 0
    for r in meta:
        item = cache.load(cache.key(r))
        assert torch.equal(item["target_latents"], load_file(str(r.latents))["latents"])


def test_diffsynth_reads_the_folder_unchanged(pipe, tmp_path):
    """What DiffSynth's UnifiedDataset does: pandas.read_csv, os.path.join(base, image), the extra inputs."""
    import pandas as pd  # a test requirement: DiffSynth reads metadata.csv with it, so we check with it too
    out = tmp_path / "ds"
    generate_distill_dataset(pipe, PROMPTS[:2], out, student_steps=4, student_cfg=1.0, **FAST)
    frame = pd.read_csv(out / METADATA_NAME)
    for record in frame.to_dict("records"):
        with Image.open(os.path.join(out, record["image"])) as im:
            assert im.size == (32, 32)
        assert record["num_inference_steps"] == 4 and record["cfg_scale"] == 1 and record["rand_device"] == "cpu"
        assert int(record["seed"]) == record["seed"]


def test_targets_equal_a_fresh_teacher_sample(pipe, tmp_path):
    out = tmp_path / "ds"
    generate_distill_dataset(pipe, PROMPTS, out, batch_size=1, **FAST)
    for r in read_metadata(out):
        fresh = pipe.sample(r.prompt, seeds=r.seed, steps=3, cfg_scale=3.0, negative_prompt="blurry", height=32,
                            width=32, rand_device="cpu", output="both")
        stored = load_file(str(r.latents))["latents"]
        assert stored.shape == (16, 4, 4) and stored.dtype == torch.float32
        assert torch.equal(stored, fresh.latents[0])                       # the same noise, steps, cfg: bit-exact
        assert pixels(r.image) == fresh.images[0].tobytes()                # lossless PNG of the teacher's image
        assert to_pil(pipe.decode(stored[None]))[0].tobytes() == pixels(r.image)   # the image is the latents'

    # batched generation matches per-image sampling up to float reassociation
    batched = tmp_path / "batched"
    generate_distill_dataset(pipe, PROMPTS, batched, batch_size=3, **FAST)
    for a, b in zip(read_metadata(out), read_metadata(batched)):
        assert (a.prompt, a.seed) == (b.prompt, b.seed)
        torch.testing.assert_close(load_file(str(a.latents))["latents"], load_file(str(b.latents))["latents"],
                                   atol=1e-5, rtol=1e-5)


def test_direct_distill_loss_of_the_teacher_itself_is_zero(pipe, tmp_path):
    """Rows made with student settings == teacher settings: the teacher, trained as its own student, is already
    perfect. This holds only if the trainer draws the same noise (seed, rand_device) and schedule as the teacher."""
    from dit_distillery.data import EncodingDataset, collate
    from dit_distillery.losses import DirectDistillLoss, SampleRNG

    out = tmp_path / "ds"
    generate_distill_dataset(pipe, PROMPTS[:2], out, seeds_per_prompt=2, batch_size=4, teacher_steps=3,
                             teacher_cfg=1.0, student_steps=3, student_cfg=1.0, height=32, width=32)
    rows = read_metadata(out).rows
    data = EncodingDataset(rows, pipe.codec, pipe.prompt_encoder, Resolution(32, 32, factor=pipe.size_multiple))
    batch = collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        loss, _ = DirectDistillLoss()(pipe.dit, batch, SampleRNG(0, 0, list(range(len(rows)))))
        shifted = dict(batch, seed=[s + 100 for s in batch["seed"]])   # other noise: far from the targets
        other, _ = DirectDistillLoss()(pipe.dit, shifted, SampleRNG(0, 0, list(range(len(rows)))))
    assert loss.item() < 1e-9 and other.item() > 0.1


def test_resume_skips_extends_and_repairs(pipe, tmp_path):
    out = tmp_path / "ds"
    generate_distill_dataset(pipe, PROMPTS[:2], out, seeds_per_prompt=2, **FAST)
    before = files(out)
    again = generate_distill_dataset(pipe, PROMPTS[:2], out, seeds_per_prompt=2, **FAST)
    assert again["rows_written"] == 0 and again["rows_skipped"] == 4 and files(out) == before

    grown = generate_distill_dataset(pipe, PROMPTS, out, seeds_per_prompt=2, **FAST)   # a prompt appended
    assert grown["rows_written"] == 2 and grown["rows_skipped"] == 4
    rows = read_metadata(out).rows
    assert len(rows) == 6 and len({(r.prompt, r.seed) for r in rows}) == 6
    assert all(before[k] == v for k, v in files(out).items() if k in before and k != METADATA_NAME)

    lost, damaged = rows[1], rows[4]
    lost.image.unlink()                                   # rows whose files went missing or bad are regenerated,
    damaged.latents.write_bytes(b"not safetensors")       # requested this time (lost) or not (damaged)
    (out / "latents" / "junk.tmp").write_text("x")        # unrelated files are left alone
    repaired = generate_distill_dataset(pipe, PROMPTS[:1], out, seeds_per_prompt=2, **FAST)
    assert repaired["rows_repaired"] == 2 and repaired["rows_written"] == 2 and repaired["rows_skipped"] == 1
    rows = read_metadata(out, validate=True).rows
    assert len(rows) == 6 and len({(r.prompt, r.seed) for r in rows}) == 6 and lost.image.is_file()
    assert (out / "latents" / "junk.tmp").is_file()


def test_failure_while_writing_leaves_only_complete_rows(pipe, tmp_path, monkeypatch):
    """Files first, then the row: a crash while writing a batch's files leaves no row pointing at them."""
    import dit_distillery.gen_dataset as gen

    real, calls = gen.save_safetensors, []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "save_safetensors", failing_save)
    out = tmp_path / "ds"
    with pytest.raises(OSError):
        generate_distill_dataset(pipe, PROMPTS, out, seeds_per_prompt=2, batch_size=2, **FAST)
    assert len(read_metadata(out, validate=True)) == 2
    monkeypatch.setattr(gen, "save_safetensors", real)
    assert generate_distill_dataset(pipe, PROMPTS, out, seeds_per_prompt=2, batch_size=2, **FAST)["rows_written"] == 4


def test_interrupted_run_leaves_complete_rows_and_resumes(pipe, tmp_path):
    out = tmp_path / "ds"
    progress = []
    with pytest.raises(StopRequested, match="4 of 6 rows"):
        generate_distill_dataset(pipe, PROMPTS, out, seeds_per_prompt=2, batch_size=2,
                                 progress=lambda d, t: progress.append(d), stop=lambda: len(progress) > 2, **FAST)
    rows = read_metadata(out, validate=True).rows  # every row's files exist and open
    assert len(rows) == 4

    # stopped inside a batch (between denoising steps): that batch leaves no row
    polls = []

    def stop_mid_batch():
        polls.append(1)
        return len(polls) > 2  # batch check, step 1, then stop before step 2

    with pytest.raises(StopRequested, match="0 of 2 rows.*before step 2"):
        generate_distill_dataset(pipe, PROMPTS, out, seeds_per_prompt=2, batch_size=2, stop=stop_mid_batch, **FAST)
    assert len(read_metadata(out, validate=True)) == 4

    done = generate_distill_dataset(pipe, PROMPTS, out, seeds_per_prompt=2, batch_size=2, **FAST)
    assert done["rows_written"] == 2 and done["rows_skipped"] == 4
    rows = read_metadata(out, validate=True).rows
    assert [(r.prompt, r.seed) for r in rows] == [(p, 2 * i + k) for i, p in enumerate(PROMPTS) for k in range(2)]
    assert not list(out.rglob("*.tmp"))


# ----------------------------------------------------------------------------------------------------------
# Bad input writes nothing

@pytest.mark.parametrize("change, field", [
    (dict(prompts=[]), "prompts"),
    (dict(seeds_per_prompt=0), "seeds_per_prompt"),
    (dict(seeds_per_prompt=1.5), "seeds_per_prompt"),
    (dict(start_seed=-1), "start_seed"),
    (dict(height=40), "size"),             # not a multiple of 16 (VAE 8 x patch 2)
    (dict(width=8), "size"),
    (dict(teacher_steps=0), "teacher_steps"),
    (dict(teacher_cfg=float("nan")), "teacher_cfg"),
    (dict(student_steps="4"), "student_steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(rand_device="nowhere"), "rand_device"),
])
def test_bad_input_raises_and_writes_nothing(pipe, tmp_path, change, field):
    args = dict(FAST, prompts=PROMPTS[:1])
    args.update(change)
    with pytest.raises(DistilleryError) as info:
        generate_distill_dataset(pipe, args.pop("prompts"), tmp_path / "ds", **args)
    assert info.value.field == field
    assert not (tmp_path / "ds").exists()


def test_changed_settings_on_existing_folder_are_refused(pipe, tmp_path):
    out = tmp_path / "ds"
    generate_distill_dataset(pipe, PROMPTS[:2], out, **FAST)
    before = files(out)
    for change in (dict(teacher_steps=4), dict(teacher_cfg=5.0), dict(negative_prompt=""), dict(student_steps=8),
                   dict(height=48, width=48)):
        with pytest.raises(DistilleryError, match="other settings.*" + next(iter(change))):
            generate_distill_dataset(pipe, PROMPTS, out, **dict(FAST, **change))
    with pytest.raises(DistilleryError, match=r"teacher\.dit"):   # another teacher's weights
        generate_distill_dataset(tiny.tiny_pipeline("qwen_image", seed=1), PROMPTS, out, **FAST)
    assert files(out) == before

    foreign = tmp_path / "shapes"                                  # a dataset we did not generate
    write_dataset(foreign, n=2)
    before = files(foreign)
    with pytest.raises(DistilleryError, match="not written by gen-dataset"):
        generate_distill_dataset(pipe, PROMPTS, foreign, **FAST)
    assert files(foreign) == before


# ----------------------------------------------------------------------------------------------------------
# CLI

def test_cli_generates_and_resumes(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle on a blue background\na green square on a white background\n")
    argv = ["gen-dataset", "--pipeline", "tiny:qwen_image", "--prompts", str(prompts), "--out", str(tmp_path / "ds"),
            "--seeds-per-prompt", "2", "--teacher-steps", "2", "--teacher-cfg", "2", "--height", "32", "--width", "32",
            "--batch-size", "3", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows_written"] == 4 and report["family"] == "qwen_image" and report["images_per_second"] > 0
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows_written"] == 0 and report["rows_skipped"] == 4
    assert len(read_metadata(tmp_path / "ds")) == 4

    assert main(argv[:-3] + ["--height", "33", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["field"] == "size"
    assert main(["gen-dataset", "--pipeline", "tiny", "--prompts", str(tmp_path / "nope.txt"),
                 "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
