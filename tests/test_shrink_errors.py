"""Shrink DiT's bad input: a clear DistilleryError (or StopRequested) and nothing left on disk."""

import errno
import struct

import pytest
import torch
from safetensors.torch import save_file

from dit_distillery import formats
from dit_distillery.conditioning import TextEmbeds
from dit_distillery.errors import DistilleryError, StopRequested
from dit_distillery.models import qwen_image
from dit_distillery.shrink import Calibration, shrink


@pytest.fixture(scope="module")
def state():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**qwen_image.tiny_config(num_layers=6))
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("src") / "qwen_tiny.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    yield d
    assert list(d.iterdir()) == [], "a failed shrink left files behind"


@pytest.mark.parametrize("kwargs, field, words", [
    (dict(layers=0), "layers", "1..6"),
    (dict(layers=7), "layers", "source has 6 blocks"),
    (dict(layers="3"), "layers", "whole number"),
    (dict(heads=0), "heads", "1..4"),
    (dict(heads=5), "heads", "source has 4 heads"),
    (dict(heads=2.5), "heads", "1..4"),
    (dict(strategy="list", keep_blocks="0-9,5"), "keep_blocks", "out of range"),
    (dict(strategy="list", keep_blocks="0,1,1,5"), "keep_blocks", "more than once"),
    (dict(strategy="list", keep_blocks="0-3"), "keep_blocks", "last block (5) is missing"),
    (dict(strategy="list", keep_blocks="a-b"), "keep_blocks", "cannot read"),
    (dict(strategy="list", keep_blocks="0,5", layers=3), "layers", "keeps 2 blocks"),
    (dict(strategy="list"), "keep_blocks", "needs the blocks"),
    (dict(keep_blocks="0,5"), "keep_blocks", "strategy 'list'"),
    (dict(strategy="interval", layers=3, keep_first=3), "keep_first", "0..2"),
    (dict(keep_first=1, layers=3), "keep_first", "only the 'interval'"),
    (dict(strategy="importance"), "layers", "needs the number"),
    (dict(strategy="best"), "strategy", "unknown"),
    (dict(heads=2, width_method="random"), "width_method", "unknown"),
    (dict(dtype="int8"), "dtype", "unknown dtype"),
    (dict(dtype="fp8_e5m2"), "dtype", "not an output dtype"),
    (dict(strategy="importance", layers=3, calibration=Calibration(torch.zeros(1, 4, 8, 8), TextEmbeds(torch.zeros(1, 3, 32)))),
     "calibration.latents", "[B, 16, h, w]"),
    (dict(strategy="importance", layers=3, calibration=Calibration(torch.zeros(2, 16, 8, 8), TextEmbeds(torch.zeros(2, 3, 7)))),
     "calibration.text", "32]"),
    (dict(heads=2, width_method="importance", calibration=Calibration(
        torch.zeros(1, 16, 8, 8), TextEmbeds(torch.zeros(1, 3, 32)), torch.tensor([1.5]))), "calibration.sigmas", "[0, 1]"),
])
def test_bad_arguments(source, out_dir, kwargs, field, words):
    with pytest.raises(DistilleryError) as info:
        shrink(source, out_dir / "s.safetensors", **kwargs)
    assert info.value.field == field and words in str(info.value) and info.value.fix


def test_bad_outputs(source, out_dir):
    with pytest.raises(DistilleryError, match="ending in .safetensors"):
        shrink(source, out_dir / "s.ckpt", layers=2)
    with pytest.raises(DistilleryError, match="source file itself"):
        shrink(source, source, layers=2)
    (out_dir.parent / "a_file").write_text("x")
    with pytest.raises(DistilleryError, match="not a folder"):
        shrink(source, out_dir / "s.safetensors", layers=2, diffusers_folder=out_dir.parent / "a_file")


def test_bad_sources(tmp_path, state, out_dir):
    cases = {}
    cases["missing"] = (tmp_path / "nope.safetensors", "no such file")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    cases["corrupt"] = (bad, "corrupt")
    good = tmp_path / "good.safetensors"
    save_file(state, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    cases["truncated"] = (truncated, "corrupt or incomplete")
    other = tmp_path / "sdxl_unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(4, 4)}, str(other))
    cases["other model"] = (other, "not a Qwen-Image")
    incomplete = tmp_path / "incomplete.safetensors"
    save_file({k: v for k, v in state.items() if k != "transformer_blocks.2.attn.to_k.weight"}, str(incomplete))
    cases["incomplete"] = (incomplete, "not a complete Qwen-Image DiT")
    blockwise = tmp_path / "qwen_blockwise_fp8.safetensors"  # scaled fp8 is shrunk (test_shrink_fp8.py); blocks not
    save_file({**state, "scaled_fp8": torch.zeros(0), "transformer_blocks.0.attn.to_q.scale_weight": torch.ones(7)},
              str(blockwise))
    cases["block-wise scales"] = (blockwise, "block-wise scales")
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04")
    cases["pickle"] = (pickled, "only .safetensors")
    for name, (path, words) in cases.items():
        with pytest.raises(DistilleryError) as info:
            shrink(path, out_dir / "s.safetensors", layers=2)
        assert info.value.field == "source" and words in str(info.value), name


def test_disk_full_while_writing_leaves_nothing(source, out_dir, monkeypatch):
    real_open = open

    class FillsUp:
        """A file whose writes fail with ENOSPC once 64 KB are on 'disk'."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(memoryview(data).cast("B"))
            if self.n > 64 * 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(formats, "open", lambda *a, **k: FillsUp(real_open(*a, **k)), raising=False)
    with pytest.raises(DistilleryError, match="disk filled up") as info:
        shrink(source, out_dir / "s.safetensors", layers=3)
    assert info.value.field == "out"


def test_not_enough_free_space_is_refused_up_front(source, out_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DistilleryError, match="only 0.00 GiB is free"):
        shrink(source, out_dir / "s.safetensors", layers=3)


def test_stop_and_progress(source, out_dir):
    calls = []
    with pytest.raises(StopRequested):
        shrink(source, out_dir / "s.safetensors", layers=3, heads=2, progress=lambda d, t, **i: calls.append((d, t, i)),
               stop=lambda: len(calls) >= 5)
    stages = [c[2]["stage"] for c in calls]
    assert stages and set(stages) <= {"score", "write"}
