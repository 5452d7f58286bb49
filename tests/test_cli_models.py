"""`build-aaadit` and `report` through the real CLI entry point (`dit_distillery.cli.main`)."""

import json

import torch

from dit_distillery.cli import main
from dit_distillery.formats import TensorSource
from dit_distillery.models import registry
from dit_distillery.models.aaadit import AAADiT


def run_json(capsys, argv):
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1])


def test_build_aaadit_writes_a_loadable_folder_and_single_file(tmp_path, capsys):
    out, single = tmp_path / "aaadit", tmp_path / "aaadit.safetensors"
    code, report = run_json(capsys, ["build-aaadit", "--preset", "tiny", "--width", "96", "--heads", "3",
                                     "--pos-grid", "2x3", "--seed", "7", "--dtype", "bf16", "--out", str(out),
                                     "--single-file", str(single)])
    assert code == 0
    assert report["out"] == str(out) and report["single_file"] == str(single)
    assert report["config"]["width"] == 96 and report["config"]["num_heads"] == 3
    assert report["config"]["pos_grid"] == [2, 3]
    folder = AAADiT.from_pretrained(out)
    assert sum(p.numel() for p in folder.parameters()) == report["params"]
    with TensorSource(out) as src:
        assert {src.dtype(k) for k in src.keys()} == {torch.bfloat16}
    from_file = registry.load_dit(single)
    assert registry.model_config(from_file) == registry.model_config(folder) == report["config"]
    for key, value in folder.state_dict().items():
        assert torch.equal(value.bfloat16(), from_file.state_dict()[key])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    # same seed, same weights; the folder is only replaced when asked
    assert main(["build-aaadit", "--preset", "tiny", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    code, _ = run_json(capsys, ["build-aaadit", "--preset", "tiny", "--seed", "7", "--out", str(out), "--overwrite"])
    assert code == 0 and AAADiT.from_pretrained(out).config.width == 64


def test_build_aaadit_tutorial_default(tmp_path, capsys):
    code, report = run_json(capsys, ["build-aaadit", "--out", str(tmp_path / "t")])
    assert code == 0 and report["params"] == 128_824_448 and report["config"]["num_blocks"] == 10


def test_build_aaadit_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    for argv in (["--width", "100", "--heads", "3"], ["--pos-grid", "16xa"], ["--blocks", "0"], []):
        target = [] if argv == [] else ["--out", str(tmp_path / "x")]
        code, report = run_json(capsys, ["build-aaadit", "--preset", "tiny", *argv, *target])
        assert code == 2 and report["error"]["fix"]
    assert main(["build-aaadit", "--single-file", str(tmp_path / "x.pt")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_report_cli(tmp_path, capsys):
    code, report = run_json(capsys, ["report", "qwen-image", "--layers", "12", "--heads", "12", "--height", "512",
                                     "--width", "512"])
    assert code == 0 and report["params"] == 1_032_960_576
    assert report["config"]["num_layers"] == 12 and "layers 12" in report["source"]
    assert report["training"]["lora"]["trainable_params"] < report["params"]

    main(["build-aaadit", "--preset", "tiny", "--out", str(tmp_path / "m")])
    capsys.readouterr()
    code, report = run_json(capsys, ["report", str(tmp_path / "m"), "--batch", "2", "--no-checkpointing",
                                     "--lora-targets", "aaadit_attn", "--lora-rank", "4"])
    assert code == 0 and report["family"] == "aaadit" and report["setting"]["gradient_checkpointing"] is False
    assert report["training"]["lora"]["modules"] == 2 * 4

    assert main(["report", "aaadit-tiny", "--height", "256", "--width", "256"]) == 0  # readable text
    text = capsys.readouterr().out
    assert "params: 111,440" in text and "full training:" in text and "lora training:" in text

    for argv in (["no-such-model"], ["aaadit-tiny", "--height", "100"], ["aaadit-tiny", "--heads", "5"],
                 ["aaadit-tiny", "--lora-targets", "to_qq"]):
        code, report = run_json(capsys, ["report", *argv])
        assert code == 2 and report["error"]["field"]
