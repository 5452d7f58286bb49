"""Shrink DiT on FLUX.2 [klein] through the public paths (`shrink.shrink`, the CLI, the node): depth per block
stack, streamed, in the source's naming (width and importance: tests/test_family_flux2.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_distillery import families
from dit_distillery.cli import main
from dit_distillery.errors import DistilleryError
from dit_distillery.models import registry
from dit_distillery.shrink import plan_shrink, shrink
from tests.test_nodes_common import fake_comfy  # noqa: F401  (fixture)

FAMILY = families.get("flux2")
DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"


@pytest.fixture(scope="module")
def pipe():
    return FAMILY.tiny_pipeline(seed=0)


@pytest.fixture
def source(pipe, tmp_path):
    """A tiny klein DiT (3 double, 4 single blocks) in ComfyUI's BFL names, as ComfyUI users keep it; its text
    width is the tiny pipeline's so the student samples with it."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = FAMILY.model_class()(**FAMILY.tiny_config(num_layers=3, num_single_layers=4,
                                                          joint_attention_dim=pipe.dit.config.joint_attention_dim))
    path = tmp_path / "klein_bfl.safetensors"
    save_file(FAMILY.to_comfy({k: v.contiguous() for k, v in model.state_dict().items()}), str(path))
    return path, model.eval()


def _check_student(path, model, kept: dict):
    """Every student tensor is its renumbered source block's, bit for bit, under BFL names."""
    stored = load_file(str(path))
    assert any(k.startswith("double_blocks.") for k in stored) and not any(k.startswith(DOUBLE) for k in stored)
    name, config, _ = families.detect(str(path))
    assert name == "flux2" and (config["num_layers"], config["num_single_layers"]) == (len(kept[DOUBLE]),
                                                                                       len(kept[SINGLE]))
    source = model.state_dict()
    ours = FAMILY.from_comfy(stored)
    for key, value in ours.items():
        for attr in (SINGLE, DOUBLE):  # single first: "transformer_blocks." is inside its name
            if key.startswith(attr + "."):
                index, rest = key[len(attr) + 1:].split(".", 1)
                key = f"{attr}.{kept[attr][int(index)]}.{rest}"
                break
        assert torch.equal(value, source[key]), key
    return registry.load_dit(path)


def test_shrink_keeps_blocks_per_stack_bit_exact_and_reuses(source, pipe, tmp_path):
    path, model = source
    out = tmp_path / "student.safetensors"
    report = shrink(path, out, layers=f"{DOUBLE}=2, {SINGLE}=2", strategy="interval")
    kept = {DOUBLE: [0, 2], SINGLE: [0, 3]}
    assert report["kept_blocks"] == kept and report["layers_after"] == {DOUBLE: 2, SINGLE: 2}
    assert report["params_after"] < report["params_before"] and not report.get("reused")
    student = _check_student(out, model, kept)
    result = pipe.with_dit(student).sample("a red fox", steps=2, height=32, width=32, output="latent")
    assert torch.isfinite(result.latents).all()
    # reuse: same settings keep the file; other settings are refused without overwrite
    stamp = out.stat().st_mtime_ns
    again = shrink(path, out, layers={DOUBLE: 2, SINGLE: 2}, strategy="interval", reuse=True, overwrite=False)
    assert again["reused"] and out.stat().st_mtime_ns == stamp
    with pytest.raises(DistilleryError, match="other settings"):
        shrink(path, out, layers={DOUBLE: 1}, reuse=True, overwrite=False)
    # a single number is the main (single-stream) stack's; the double stack stays whole
    plan = plan_shrink(path, layers=2)
    assert plan.kept_blocks == {SINGLE: [0, 3], DOUBLE: [0, 1, 2]}


def test_list_strategy_per_stack_and_source_naming(source, tmp_path):
    path, model = source
    out = tmp_path / "listed.safetensors"
    report = shrink(path, out, strategy="list", keep_blocks=f"{DOUBLE}=1,2; {SINGLE}=0-1,3", dtype="bf16")
    kept = {DOUBLE: [1, 2], SINGLE: [0, 1, 3]}
    assert report["kept_blocks"] == kept
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(out)).values())
    # a source in our (diffusers) names gives a student in our names
    ours = tmp_path / "klein_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ours))
    shrink(ours, tmp_path / "ours.safetensors", layers={DOUBLE: 1})
    stored = load_file(str(tmp_path / "ours.safetensors"))
    assert set(stored) == set(registry.build_empty("flux2", families.detect(str(tmp_path / "ours.safetensors"))[1])
                              .state_dict())


def test_cli_shrinks_flux2_per_stack(source, tmp_path, capsys):
    path, model = source
    out = tmp_path / "cli.safetensors"
    code = main(["shrink", str(path), "--out", str(out), "--layers", f"{DOUBLE}=1,{SINGLE}=3", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["kept_blocks"] == {DOUBLE: [2], SINGLE: [0, 2, 3]}
    _check_student(out, model, report["kept_blocks"])
    code = main(["shrink", str(path), "--out", str(tmp_path / "w.safetensors"), "--heads", "3", "--json"])
    assert code == 2 and not (tmp_path / "w.safetensors").exists()  # the source has 2 heads


@pytest.mark.parametrize("kwargs, field, words", [
    (dict(heads=3), "heads", "2 heads per block"),
    (dict(strategy="importance"), "layers", "number of blocks to keep"),
    (dict(layers="double=2"), "layers", "no block stack"),
    (dict(layers=f"{DOUBLE}=9"), "layers", "3 blocks"),
    (dict(layers=f"{DOUBLE}=x"), "layers", "whole number"),
    (dict(strategy="list", keep_blocks=f"{DOUBLE}=0"), "keep_blocks", "last block"),
])
def test_refusals_name_the_field(source, tmp_path, kwargs, field, words):
    path, _ = source
    with pytest.raises(DistilleryError) as info:
        shrink(path, tmp_path / "x.safetensors", **kwargs)
    assert info.value.field == field and words in str(info.value) and info.value.fix
    assert not (tmp_path / "x.safetensors").exists()


def test_single_stack_families_accept_the_named_form(tmp_path):
    """Qwen-Image's one stack may be named too; its other (kept) stacks may not."""
    from dit_distillery.models import qwen_image
    from dit_distillery.shrink.synthetic import write_synthetic_source

    path = tmp_path / "qwen.safetensors"
    write_synthetic_source(path, qwen_image.tiny_config(num_layers=4), dtype=torch.float32)
    assert plan_shrink(path, layers="transformer_blocks=2").kept_blocks == plan_shrink(path, layers=2).kept_blocks


def test_node_shrinks_flux2_per_stack_and_reuses(source, fake_comfy):  # noqa: F811 (fixture)
    """The Shrink DiT node: per-stack counts in block_list (target_blocks then ignored), same settings reuse."""
    import shutil

    from tests.test_nodes_common import call

    path, model = source
    shutil.copy(path, fake_comfy.base / "models" / "diffusion_models" / "klein_bfl.safetensors")
    options = dict(source="klein_bfl.safetensors", target_blocks=30, block_list=f"{DOUBLE}=2, {SINGLE}=2",
                   name="klein_small.safetensors")
    dit, report = call("DD_ShrinkDiT", **options)
    assert dit.family == "flux2" and (dit.config["num_layers"], dit.config["num_single_layers"]) == (2, 2)
    _check_student(dit.path, model, {DOUBLE: [0, 2], SINGLE: [0, 3]})
    _, again = call("DD_ShrinkDiT", **options)
    assert "reused: True" in again
    with pytest.raises(DistilleryError, match="2 heads per block"):
        call("DD_ShrinkDiT", **dict(options, heads=3, name="narrow.safetensors"))
