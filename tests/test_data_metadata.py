"""DiffSynth-format metadata: CSV / JSON / JSONL / captioned folder, every bad-data case, skip mode."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dit_distillery.data import read_metadata
from dit_distillery.errors import DistilleryError
from dit_distillery.formats import save_safetensors

HEADER = "image,prompt,seed,rand_device,num_inference_steps,cfg_scale,teacher_steps,teacher_cfg,latents\n"


@pytest.fixture
def base(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / name)
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (48, 32), (10, 10, 200)).save(tmp_path / "sub" / "c.jpg")
    save_safetensors({"latents": torch.zeros(4, 2, 2)}, tmp_path / "a_latents.safetensors")
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_diffsynth_distill_columns(base):
    # the distill dataset of DiffSynth's docs, plus our teacher columns; a quoted prompt with a comma and a newline
    write(base / "metadata.csv", HEADER +
          'a.png,"a red, round thing",0,cpu,4,1,40,4,a_latents.safetensors\n'
          'sub/c.jpg,"two\nlines",7.0,cuda,,,,,\n'
          'b.png,plain,,,,,,,\n')
    meta = read_metadata(base)
    assert [r.row for r in meta] == [2, 3, 5]  # file lines as a text editor shows them (header = line 1)
    a, c, b = meta.rows
    assert a.image == base / "a.png" and a.prompt == "a red, round thing"
    assert (a.seed, a.rand_device, a.num_inference_steps, a.cfg_scale) == (0, "cpu", 4, 1.0)
    assert (a.teacher_steps, a.teacher_cfg, a.latents) == (40, 4.0, base / "a_latents.safetensors")
    assert c.image == base / "sub" / "c.jpg" and c.seed == 7 and c.rand_device == "cuda" and c.prompt == "two\nlines"
    assert b.seed is None and b.rand_device == "cpu" and b.num_inference_steps is None and b.latents is None
    assert meta.skipped == 0 and a.where == "metadata.csv line 2"


def test_json_and_jsonl_and_bom_and_extra_columns(base):
    rows = [{"image": "a.png", "prompt": "x", "seed": 3, "style": "flat"}, {"image": "b.png", "prompt": "y"}]
    write(base / "m.json", json.dumps(rows))
    meta = read_metadata(base, base / "m.json")
    assert [r.row for r in meta] == [1, 2] and meta[0].seed == 3 and meta[0].extra == {"style": "flat"}
    assert meta[1].where == "m.json entry 2"
    write(base / "m.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [(r.row, r.prompt) for r in read_metadata(base, base / "m.jsonl")] == [(1, "x"), (2, "y")]
    (base / "bom.csv").write_bytes("image,prompt\na.png,z\n".encode("utf-8-sig"))  # Excel's byte-order mark
    assert read_metadata(base, base / "bom.csv")[0].prompt == "z"
    write(base / "trailing.csv", "image,prompt\na.png,z,,\n")  # spreadsheets' trailing empty cells are fine
    assert read_metadata(base, base / "trailing.csv")[0].prompt == "z"


def test_absolute_image_paths_stay_absolute(base, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "d.png"
    Image.new("RGB", (16, 16)).save(other)
    write(base / "metadata.csv", f"image,prompt\n{other},p\n")
    assert read_metadata(base)[0].image == other  # os.path.join semantics, as DiffSynth


def test_captioned_folder(tmp_path):
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    write(tmp_path / "a.txt", "first\n")
    write(tmp_path / "b.txt", "second")
    meta = read_metadata(tmp_path)
    assert [(r.image.name, r.prompt, r.where) for r in meta] == [("a.jpg", "first", "a.jpg"), ("b.png", "second", "b.png")]
    (tmp_path / "b.txt").unlink()
    with pytest.raises(DistilleryError, match=r"b\.png.*no caption file.*Fix: write the prompt into b\.txt"):
        read_metadata(tmp_path)
    assert len(read_metadata(tmp_path, on_error="skip")) == 1


BAD_ROWS = [
    # (csv line, message pattern naming the row, the column and the fix)
    ("missing.png,p,,,,,,,", r"line 2, image.*does not exist.*Fix: check the path"),
    ("a.png,,,,,,,,", r"line 2, prompt.*empty prompt.*Fix: write a caption"),
    ("a.png,p,seven,,,,,,", r"line 2, seed='seven'.*not a number.*Fix: write a number in seed"),
    ("a.png,p,1.5,,,,,,", r"line 2, seed='1.5'.*whole number"),
    ("a.png,p,-1,,,,,,", r"line 2, seed.*whole number >= 0"),
    ("a.png,p,,,0,,,,", r"line 2, num_inference_steps.*>= 1"),
    ("a.png,p,,,,nan,,,", r"line 2, cfg_scale.*finite"),
    ("a.png,p,,,,,x,,", r"line 2, teacher_steps.*not a number"),
    ("a.png,p,,gpu0,,,,,", r"line 2, rand_device='gpu0'.*torch device"),
    ("a.png,p,,,,,,,nope.safetensors", r"line 2, latents.*does not exist"),
    ("a.png,p,,,,,,,a.png", r"line 2, latents.*safetensors files only"),
    ("a.png,a, b,,,,,,,,extra", r"line 2, row.*more fields than columns.*Fix: quote values"),
]


@pytest.mark.parametrize("line,pattern", BAD_ROWS)
def test_bad_rows_name_row_and_fix(base, line, pattern):
    write(base / "metadata.csv", HEADER + line + "\nb.png,fine,,,,,,,\n")
    with pytest.raises(DistilleryError, match=pattern):
        read_metadata(base)
    meta = read_metadata(base, on_error="skip")
    assert [r.image.name for r in meta] == ["b.png"] and meta.skipped == 1
    assert "metadata.csv line 2" in meta.reasons[0]


def test_missing_column_and_bad_files(base):
    write(base / "metadata.csv", "image,caption\na.png,x\n")
    with pytest.raises(DistilleryError, match=r"line 1 \(header\).*missing column.*prompt"):
        read_metadata(base, on_error="skip")  # no row could be valid: never skipped
    write(base / "m.jsonl", '{"image": "a.png", "prompt": "x"}\n{"image": "b.png"}\n{"image": oops}\n')
    with pytest.raises(DistilleryError, match=r"m\.jsonl line 2, prompt.*column is missing"):
        read_metadata(base, base / "m.jsonl")
    meta = read_metadata(base, base / "m.jsonl", on_error="skip")
    assert len(meta) == 1 and meta.skipped == 2 and "line 3" in meta.reasons[1] and "JSON" in meta.reasons[1]
    write(base / "m.json", '{"image": "a.png"}')
    with pytest.raises(DistilleryError, match="must hold a list"):
        read_metadata(base, base / "m.json")
    write(base / "m.json", '[{"image": "a.png", "prompt": "x"},\n {"image": }]')
    with pytest.raises(DistilleryError, match=r"m\.json line 2.*not valid JSON"):
        read_metadata(base, base / "m.json")
    with pytest.raises(DistilleryError, match="no such file"):
        read_metadata(base, base / "absent.csv")
    with pytest.raises(DistilleryError, match="unknown mode"):
        read_metadata(base, on_error="ignore")
    write(base / "metadata.csv", "image,prompt\nmissing.png,x\n")
    with pytest.raises(DistilleryError, match=r"no usable rows \(1 skipped"):
        read_metadata(base, on_error="skip")


def test_unreadable_image_lazy_or_validated(base):
    (base / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    write(base / "metadata.csv", "image,prompt\nbroken.png,x\na.png,y\n")
    meta = read_metadata(base)  # lazily: reading the metadata only checks that the file exists
    from dit_distillery.data import load_image

    with pytest.raises(DistilleryError, match=r"metadata\.csv line 2, image.*not a readable image.*Fix: replace"):
        load_image(meta[0].image, meta[0].where)
    with pytest.raises(DistilleryError, match=r"line 2, image.*not a readable image"):
        read_metadata(base, validate=True)
    assert [r.prompt for r in read_metadata(base, validate=True, on_error="skip")] == ["y"]
    (base / "bad.safetensors").write_bytes(b"garbage")
    write(base / "metadata.csv", "image,prompt,latents\na.png,x,bad.safetensors\n")
    assert read_metadata(base)[0].latents.name == "bad.safetensors"
    with pytest.raises(DistilleryError, match=r"line 2, latents.*not a readable safetensors"):
        read_metadata(base, validate=True)
