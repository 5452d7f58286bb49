"""Faults a hostile or careless user causes with their input (issue 9, section 3), each refused clearly:

* typed job fields: wrong JSON types, Infinity/NaN, a string where a list belongs, bad betas/dtypes/synthetic
  keys/loss options, no validation seed: refused by `TrainJob.from_dict`, before any work, naming the field;
* a full disk under a safetensors write (checkpoint, latent cache): a clear error naming the file, the
  temporary removed, what was saved before intact;
* `data.on_error`: "skip" leaves undecodable and missing images out of the cache and training and counts
  them; "raise" names the row's file and the way to skip.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from dit_distillery.data import LatentCache, Resolution, build_cache, read_metadata
from dit_distillery.errors import DistilleryError
from dit_distillery.trainer import Callbacks, TrainJob, train
from dit_distillery.trainer.state import latest_checkpoint, list_checkpoints, load_checkpoint

from tests.trainer_helpers import make_job

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------------------
# Typed job fields

BASE = {"data": {"synthetic": {}}}

# (override merged into BASE, the dotted field the error must name)
BAD_JOBS = [
    ({"optim": {"lr": "1e-4"}}, "optim.lr"),
    ({"steps": True}, "steps"),
    ({"steps": "100"}, "steps"),
    ({"steps": 10.5}, "steps"),
    ({"batch_size": 2.0}, "batch_size"),
    ({"optim": {"lr": float("inf")}}, "optim.lr"),
    ({"optim": {"lr": float("nan")}}, "optim.lr"),
    ({"ema_decay": float("-inf")}, "ema_decay"),
    ({"optim": {"weight_decay": True}}, "optim.weight_decay"),
    ({"optim": {"grad_clip": "none"}}, "optim.grad_clip"),
    ({"validation": {"prompts": "a cat"}}, "validation.prompts"),
    ({"validation": {"prompts": ["a cat", 3]}}, "validation.prompts[1]"),
    ({"validation": {"prompts": ["a cat"], "seeds": []}}, "validation.seeds"),
    ({"validation": {"seeds": 0}}, "validation.seeds"),
    ({"validation": {"seeds": [0, "1"]}}, "validation.seeds[1]"),
    ({"validation": {"teacher": "yes"}}, "validation.teacher"),
    ({"validation": {"teacher_steps": 0}}, "validation.teacher_steps"),
    ({"optim": {"betas": [0.9, 1.5]}}, "optim.betas[1]"),
    ({"optim": {"betas": [-0.1, 0.999]}}, "optim.betas[0]"),
    ({"optim": {"betas": [0.9]}}, "optim.betas"),
    ({"optim": {"betas": 0.9}}, "optim.betas"),
    ({"optim": {"betas": ["0.9", 0.999]}}, "optim.betas[0]"),
    ({"optim": {"eps": 0}}, "optim.eps"),
    ({"optim": {"min_lr_ratio": 2}}, "optim.min_lr_ratio"),
    ({"data": {"synthetic": {"colour": "red"}}}, "data.synthetic.colour"),
    ({"data": {"synthetic": {"overwrite": True}}}, "data.synthetic.overwrite"),
    ({"data": {"synthetic": {"n": "8"}}}, "data.synthetic.n"),
    ({"data": {"synthetic": {"count": 0}}}, "data.synthetic.count"),
    ({"data": {"synthetic": {"count": 8, "n": 8}}}, "data.synthetic.count"),
    ({"data": {"synthetic": {"size": 8}}}, "data.synthetic.size"),
    ({"data": {"synthetic": {"jitter": 1}}}, "data.synthetic.jitter"),
    ({"data": {"synthetic": "shapes"}}, "data.synthetic"),
    ({"data": {"height": 32}}, "data.height/width"),
    ({"data": {"cache": "false"}}, "data.cache"),
    ({"data": {"on_error": "ignore"}}, "data.on_error"),
    ({"data": {"num_workers": -1}}, "data.num_workers"),
    ({"model": {"dtype": "float33"}}, "model.dtype"),
    ({"model": {"dtype": "int8"}}, "model.dtype"),
    ({"model": {"dtype": 16}}, "model.dtype"),
    ({"model": {"pipeline": None}}, "model.pipeline"),
    ({"output": {"save_dtype": "bf17"}}, "output.save_dtype"),
    ({"output": {"keep_last": -1}}, "output.keep_last"),
    ({"output": {"save_every": "500"}}, "output.save_every"),
    ({"lora": {"targets": 5}}, "lora.targets"),
    ({"lora": {"targets": ["to_q", 1]}}, "lora.targets"),
    ({"lora": {"targets": " , "}}, "lora.targets"),
    ({"lora": {"alpha": 0}}, "lora.alpha"),
    ({"lora": {"rank": "32"}}, "lora.rank"),
    ({"full_trainable": "transformer_blocks."}, "full_trainable"),
    ({"loss": {"kind": "flow_matching", "logit_std": "1"}}, "loss.logit_std"),
    ({"loss": {"kind": "flow_matching", "min_sigma": float("nan")}}, "loss.min_sigma"),
    ({"loss": {"kind": "flow_matching", "mu": float("inf")}}, "loss.mu"),
    ({"loss": {"kind": "flow_matching", "mu": "0.8"}}, "loss.mu"),
    ({"loss": {"kind": "flow_matching", "sigma_sampling": "gauss"}}, "loss.sigma_sampling"),
    ({"loss": {"kind": "flow_matching", "speed": 2}}, "loss.speed"),
    ({"loss": {"kind": "direct_distill", "steps": 0}}, "loss.steps"),
    ({"loss": {"kind": "direct_distill", "steps": True}}, "loss.steps"),
    ({"loss": {"kind": "direct_distill", "target": "pixels"}}, "loss.target"),
    ({"loss": {"kind": "consistency"}}, "loss.kind"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"resume": False}, "resume"),
    ({"optim": "adamw"}, "optim"),
    ({"optim": {"learning_rate": 1e-4}}, "optim.learning_rate"),
]


def _merge(base: dict, override: dict) -> dict:
    job = json.loads(json.dumps(base))
    for key, value in override.items():
        job[key] = {**job[key], **value} if isinstance(value, dict) and isinstance(job.get(key), dict) else value
    return job


@pytest.mark.parametrize("override,field", BAD_JOBS, ids=[f"{f}:{json.dumps(o)[:40]}" for o, f in BAD_JOBS])
def test_bad_job_field_is_refused_before_any_work(override, field, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a job that slipped through and started would write here
    with pytest.raises(DistilleryError) as info:
        TrainJob.from_dict(_merge(BASE, override))
    assert info.value.field == field, str(info.value)
    assert info.value.fix  # every refusal says what to do
    assert not any(tmp_path.iterdir())


def test_json_infinity_and_nan_in_a_job_file_are_refused(tmp_path):
    """json.loads accepts these non-standard literals: the job must not."""
    for literal, field in (("Infinity", "optim.lr"), ("-Infinity", "optim.lr"), ("NaN", "optim.lr")):
        path = tmp_path / "job.json"
        path.write_text('{"data": {"synthetic": {}}, "optim": {"lr": %s}}' % literal)
        with pytest.raises(DistilleryError, match="finite") as info:
            TrainJob.load(path)
        assert info.value.field == field


def test_messages_say_what_type_and_how_to_write_it():
    with pytest.raises(DistilleryError, match=r"must be a number, not text.*without quotes: 0\.0001"):
        TrainJob.from_dict(_merge(BASE, {"optim": {"lr": "1e-4"}}))
    with pytest.raises(DistilleryError, match="must be a list of strings, not text"):
        TrainJob.from_dict(_merge(BASE, {"validation": {"prompts": "a cat"}}))
    with pytest.raises(DistilleryError, match=r"valid keys: \[.*'n'.*'size'"):
        TrainJob.from_dict(_merge(BASE, {"data": {"synthetic": {"colour": "red"}}}))


def test_a_directly_built_job_is_checked_by_validate_too():
    job = TrainJob.from_dict(BASE)
    job.validation.prompts = "a cat"
    with pytest.raises(DistilleryError) as info:
        job.validate()
    assert info.value.field == "validation.prompts"


GOOD_JOBS = [
    {"optim": {"lr": 1, "betas": (0.9, 0.99), "grad_clip": None, "weight_decay": 0}},  # ints where floats go
    {"lora": {"targets": "to_q, to_k"}},
    {"lora": {"targets": ["to_q", "to_k"], "alpha": 16}},
    {"lora": {"targets": "preset"}},
    {"full_trainable": ["transformer_blocks.", ""], "mode": "full"},
    {"data": {"synthetic": {"count": 8, "size": 32, "seed": 3, "jitter": True}}},
    {"data": {"synthetic": {"n": 8}, "height": 32, "width": 32}},
    {"model": {"dtype": "bf16"}, "output": {"save_dtype": "fp32"}},
    {"output": {"save_dtype": "fp8"}},
    {"validation": {"prompts": [], "seeds": []}},  # no prompts: no seeds needed
    {"validation": {"prompts": ["a cat"], "seeds": [0, 1], "cfg": 1, "steps": None}},
    {"loss": {"kind": "direct_distill", "mu": "resolution", "steps": 4, "cfg": 1}},
    {"loss": {"kind": "flow_matching", "mu": 0.8, "sigma_sampling": "logit_normal", "logit_std": 1}},
    {"resume": None},
]


@pytest.mark.parametrize("override", GOOD_JOBS, ids=[json.dumps(o)[:50] for o in GOOD_JOBS])
def test_valid_jobs_still_load(override):
    job = TrainJob.from_dict(_merge(BASE, override))
    again = TrainJob.from_dict(json.loads(job.to_json()))  # what job.json holds loads back the same
    assert again.fingerprint() == job.fingerprint()


def test_readme_example_job_validates():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"A training job.*?```json\n(.*?)```", readme, re.S)
    assert block, "the README's example job was not found"
    job = TrainJob.from_dict(json.loads(block.group(1)))
    assert job.validation.prompts == ["a cat"] and job.optim.lr == 1e-4


def test_demo_jobs_validate(tmp_path, monkeypatch):
    """The demo's first job (the teacher, trained from scratch) is built by the demo itself and validates;
    capturing it stops the demo before any training."""
    import dit_distillery.demo as demo

    seen = []

    class Captured(Exception):
        pass

    def capture(job, **kwargs):
        seen.append(job)
        raise Captured

    monkeypatch.setattr(demo, "train", capture)
    with pytest.raises(Captured):
        demo.run_demo(tmp_path, demo.QUICK, log=lambda text: None)
    assert seen and isinstance(seen[0], TrainJob)
    seen[0].validate()
    TrainJob.from_dict(json.loads(seen[0].to_json()))


# ------------------------------------------------------------------------------------------------------------
# Full disk under a safetensors write

FULL_DISK = [
    'Error while serializing: I/O error: No space left on device (os error 28)',  # safetensors 0.5+
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
]


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".checkpoint-", ".tmp"))]


@pytest.mark.parametrize("message", FULL_DISK, ids=["0.8", "older"])
def test_full_disk_in_a_training_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, message):
    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if "checkpoint-0000002" in str(filename):  # the disk fills up while the second checkpoint is written
            raise safetensors.SafetensorError(message)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    job = make_job(tmp_path, steps=2, batch_size=1, data={"synthetic": {"count": 2, "size": 32}},
                   output={"save_every": 1})
    with pytest.raises(DistilleryError) as info:
        train(job)
    text = str(info.value)
    assert "no space left on device" in text and "free some space" in text, text
    assert "trainable.safetensors" in info.value.value or "optimizer.safetensors" in info.value.value
    assert isinstance(info.value.__cause__, OSError)  # the OS error stays attached for debugging
    checkpoints = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in checkpoints] == ["checkpoint-0000001"]
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert ckpt["state"]["step"] == 1 and ckpt["trainable"]
    assert not _leftovers(tmp_path), _leftovers(tmp_path)


@pytest.mark.parametrize("message", FULL_DISK, ids=["0.8", "older"])
def test_full_disk_in_the_latent_cache_keeps_what_was_cached(tmp_path, monkeypatch, message):
    from dit_distillery.data.synthetic import write_dataset
    from dit_distillery.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    res = Resolution(32, 32, factor=pipe.size_multiple)
    write_dataset(tmp_path / "a", 2, seed=0)
    write_dataset(tmp_path / "b", 2, seed=1)
    cache_dir = tmp_path / "cache"
    first, _ = build_cache(list(read_metadata(tmp_path / "a")), cache_dir, pipe.codec, pipe.prompt_encoder, res)
    shards = sorted(cache_dir.glob("shard-*.safetensors"))
    assert len(shards) == 1

    def full(tensors, filename, metadata=None):
        raise safetensors.SafetensorError(message)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DistilleryError) as info:
        build_cache(list(read_metadata(tmp_path / "b")), cache_dir, pipe.codec, pipe.prompt_encoder, res)
    assert "no space left on device" in str(info.value) and "shard-" in info.value.value
    assert Path(info.value.value).parent == cache_dir  # names the file the user will look for, not a temporary
    monkeypatch.undo()
    assert sorted(cache_dir.glob("shard-*.safetensors")) == shards and not _leftovers(cache_dir)
    cache = LatentCache(cache_dir, codec_identity=pipe.codec.identity, encoder_identity=pipe.prompt_encoder.identity,
                        resolution=res)
    rows = list(read_metadata(tmp_path / "a"))
    assert len(cache.cached_rows(rows)) == 2 and cache.load(cache.key(rows[0]))["latents"].isfinite().all()


def test_full_disk_in_teacher_dataset_latents_keeps_the_rows_written(tmp_path, monkeypatch):
    from dit_distillery.gen_dataset import generate_distill_dataset
    from dit_distillery.tiny import tiny_pipeline

    pipe, out = tiny_pipeline(), tmp_path / "teacher_data"
    fast = dict(teacher_steps=2, height=32, width=32, batch_size=1)
    generate_distill_dataset(pipe, ["a red circle on a blue background"], out, **fast)

    def full(tensors, filename, metadata=None):
        raise safetensors.SafetensorError(FULL_DISK[0])

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DistilleryError) as info:
        generate_distill_dataset(pipe, ["a red circle on a blue background", "a green square on a white background"],
                                 out, **fast)
    assert "no space left on device" in str(info.value) and info.value.value.endswith(".safetensors")
    monkeypatch.undo()
    rows = read_metadata(out, validate=True)  # the row written before is intact, its latents readable
    assert [r.prompt for r in rows] == ["a red circle on a blue background"] and not _leftovers(out)


def test_other_safetensors_errors_are_not_disguised_as_a_full_disk(tmp_path, monkeypatch):
    from dit_distillery.formats import save_safetensors

    def broken(tensors, filename, metadata=None):
        raise safetensors.SafetensorError("Error while serializing: some internal problem")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(safetensors.SafetensorError):
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 256 KB filesystem (tmpfs), where mounting one is allowed (root, outside locked-down containers)."""
    mount = tmp_path / "tiny_disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_real_full_disk_under_save_safetensors(tiny_disk):
    from dit_distillery.formats import save_safetensors

    save_safetensors({"small": torch.zeros(1000)}, tiny_disk / "small.safetensors")
    with pytest.raises(DistilleryError, match="no space left on device") as info:
        save_safetensors({"big": torch.zeros(1_000_000)}, tiny_disk / "big.safetensors")
    assert info.value.value == str(tiny_disk / "big.safetensors")
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["small.safetensors"]
    assert safetensors.torch.load_file(tiny_disk / "small.safetensors")["small"].shape == (1000,)


# ------------------------------------------------------------------------------------------------------------
# on_error: skip leaves undecodable/missing images out and counts them; raise names the row and the way out

def _noise_png(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def bad_dataset(tmp_path):
    """metadata.csv: a good image (line 2), a truncated PNG (line 3), a missing file (line 4)."""
    base = tmp_path / "data"
    base.mkdir()
    _noise_png(base / "good.png", 0)
    _noise_png(base / "truncated.png", 1)
    data = (base / "truncated.png").read_bytes()
    (base / "truncated.png").write_bytes(data[: len(data) // 2])  # the header still reads: decoding fails
    (base / "metadata.csv").write_text("image,prompt\ngood.png,a good image\ntruncated.png,a damaged image\n"
                                       "missing.png,a lost image\n")
    return base


def test_skip_trains_on_the_good_row_and_counts_both_bad_ones(bad_dataset, tmp_path):
    messages = []

    class Log(Callbacks):
        def on_message(self, text):
            messages.append(text)

    job = make_job(tmp_path / "run", steps=1, batch_size=1,
                   data={"synthetic": None, "path": str(bad_dataset), "on_error": "skip"})
    result = train(job, callbacks=Log())
    assert result.steps == 1 and result.data["rows"] == 1 and result.data["skipped"] == 2
    assert any("truncated.png" in r for r in result.data["reasons"])
    assert any("missing.png" in r for r in result.data["reasons"])
    assert sum("skipped" in m and ("truncated.png" in m or "missing.png" in m) for m in messages) == 2
    assert result.data["encoded"] == 1  # only the good image was cached


def test_skip_without_the_cache_checks_images_before_training(bad_dataset, tmp_path):
    job = make_job(tmp_path / "run", steps=1, batch_size=1,
                   data={"synthetic": None, "path": str(bad_dataset), "on_error": "skip", "cache": False})
    result = train(job)
    assert result.steps == 1 and result.data["rows"] == 1 and result.data["skipped"] == 2


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("bad", ["truncated.png", "missing.png"])
def test_raise_names_the_bad_file_its_line_and_skip(bad_dataset, tmp_path, cache, bad):
    other = "missing.png" if bad == "truncated.png" else "truncated.png"
    rows = [r for r in (bad_dataset / "metadata.csv").read_text().splitlines() if not r.startswith(other)]
    (bad_dataset / "metadata.csv").write_text("\n".join(rows) + "\n")
    job = make_job(tmp_path / "run", steps=1, batch_size=1,
                   data={"synthetic": None, "path": str(bad_dataset), "on_error": "raise", "cache": cache})
    with pytest.raises(DistilleryError) as info:
        train(job)
    text = str(info.value)
    assert bad in text and info.value.field == "metadata.csv line 3, image", text  # the good row is line 2
    assert 'on_error="skip"' in text and "data.on_error" in text
    assert not list((tmp_path / "run").glob("checkpoints/checkpoint-*"))


def test_cache_build_skip_counts_and_names_an_undecodable_image(bad_dataset, tmp_path):
    from dit_distillery.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    rows = read_metadata(bad_dataset, on_error="skip")
    assert rows.skipped == 1 and "missing.png" in rows.reasons[0]
    res = Resolution(32, 32, factor=pipe.size_multiple)
    cache, report = build_cache(list(rows), tmp_path / "cache", pipe.codec, pipe.prompt_encoder, res,
                                on_error="skip")
    assert report.skipped == 1 and report.encoded == 1 and "truncated.png" in report.reasons[0]
    assert [r.image.name for r in cache.cached_rows(rows)] == ["good.png"]
    with pytest.raises(DistilleryError, match='on_error="skip"'):
        build_cache(list(rows), tmp_path / "cache2", pipe.codec, pipe.prompt_encoder, res)
