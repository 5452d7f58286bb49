import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_distillery.errors import DistilleryError
from dit_distillery.formats import (StreamingSafetensorsWriter, TensorSource, atomic_output, decode_metadata_value,
                                    save_safetensors)


def test_streaming_writer_matches_safetensors(tmp_path):
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2, 2), "s": torch.tensor(1.5), "f8": torch.randn(4, 4).to(torch.float8_e4m3fn)}
    path = tmp_path / "x.safetensors"
    with StreamingSafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()],
                                    {"config": {"n": 1}}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    back = load_file(str(path))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    with TensorSource(path) as src:
        assert decode_metadata_value(src.metadata["config"]) == {"n": 1}
        assert src.shape("b") == (3, 5) and src.dtype("b") == torch.bfloat16


def test_streaming_writer_leaves_nothing_when_incomplete(tmp_path):
    path = tmp_path / "x.safetensors"
    w = StreamingSafetensorsWriter(path, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_streaming_writer_rejects_wrong_order_and_shape(tmp_path):
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2,))])
    with pytest.raises(ValueError):
        w.write("a", torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_failure_keeps_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(path) as tmp:
            tmp.write_text("new, half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_tensor_source_prefix_and_shards(tmp_path):
    sd = {"model.diffusion_model.img_in.weight": torch.randn(4, 2), "model.diffusion_model.x": torch.ones(1),
          "first_stage_model.y": torch.ones(1)}
    save_file(sd, str(tmp_path / "all_in_one.safetensors"))
    with TensorSource(tmp_path / "all_in_one.safetensors") as src:
        assert sorted(src.keys()) == ["img_in.weight", "x"]
        assert torch.equal(src.get_rows("img_in.weight", 1, 3), sd["model.diffusion_model.img_in.weight"][1:3])

    folder = tmp_path / "sharded" / "transformer"
    folder.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, str(folder / "m-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(folder / "m-00002-of-00002.safetensors"))
    (folder / "m.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "m-00001-of-00002.safetensors", "b": "m-00002-of-00002.safetensors"}}))
    with TensorSource(tmp_path / "sharded") as src:  # pipeline root: finds transformer/
        assert sorted(src.keys()) == ["a", "b"] and src.total_bytes() == 20


def test_tensor_source_errors(tmp_path):
    with pytest.raises(DistilleryError, match="no such file"):
        TensorSource(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(DistilleryError, match="corrupt"):
        TensorSource(bad)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(DistilleryError, match="safetensors"):
        TensorSource(pickled)
    good = tmp_path / "good.safetensors"
    save_safetensors({"a": torch.randn(100)}, good)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-50])
    with pytest.raises(DistilleryError, match="corrupt"):
        TensorSource(truncated)
