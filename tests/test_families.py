"""The DiT families in one place: no family is named in a comparison outside `families/`, every family meets the
protocol, one resolver reads any path / file / config / preset / model, and what the nodes used to hold is core."""

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_distillery import families
from dit_distillery.errors import DistilleryError
from dit_distillery.formats import TensorSource

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("dit_distillery", "nodes")


# ----------------------------------------------------------------------------------------------------------
# No family name in a comparison outside families/

def family_comparisons(source: str, names) -> list[tuple[int, str]]:
    """(line, what) of every place `source` tells families apart by name: a comparison or membership test with a
    string that is a family name (or a built-in pipeline of one, 'tiny:qwen_image'), a comparison with a family
    module's FAMILY, a dict literal keyed by a family name, dict(<family name>=...) or a match case on one."""
    named = re.compile(r"(?:^|.*:)(" + "|".join(map(re.escape, names)) + r")$")

    def names_family(node) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return bool(named.match(node.value))
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_family(e) for e in node.elts)
        return isinstance(node, ast.Attribute) and node.attr == "FAMILY"

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(names_family(n) for n in (node.left, *node.comparators)):
            found.append((node.lineno, "comparison with " + ast.unparse(node)))
        elif isinstance(node, ast.Dict) and any(k is not None and names_family(k) for k in node.keys):
            found.append((node.lineno, "dict keyed by family name"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"
              and any(k.arg in names for k in node.keywords)):
            found.append((node.lineno, "dict(...) keyed by family name"))
        elif isinstance(node, ast.MatchValue) and names_family(node.value):
            found.append((node.lineno, "match case on a family name"))
    return found


def test_the_check_catches_what_it_forbids():
    names = ("qwen_image", "aaadit")
    bad = '''
if family == "qwen_image": pass
if pipe.family != "aaadit": pass
if source in ("default", "tiny:qwen_image"): pass
if fam is not qwen_image.FAMILY: pass
DEFAULTS = {"qwen_image": 1, "aaadit": 2}
d = dict(aaadit=3)
'''
    assert len(family_comparisons(bad, names)) == 6
    fine = '''
if family != expected: pass
FAMILY = "aaadit"
name = "tiny:" + family
x = families.get("qwen_image")
if source.startswith("tiny:"): pass
COMMANDS = {"build-aaadit": "build_aaadit"}
if command == "build-aaadit": pass
'''
    assert family_comparisons(fine, names) == []


def test_no_family_is_named_in_a_comparison_outside_families():
    names = families.names()
    offenders = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("dit_distillery", "families"):
                continue
            offenders += [f"{rel}:{line}: {what}" for line, what in family_comparisons(path.read_text(), names)]
    assert not offenders, "family knowledge outside dit_distillery/families/:\n" + "\n".join(offenders)


# ----------------------------------------------------------------------------------------------------------
# The registry and the protocol

def test_registry_finds_every_family_module():
    # (private modules, `_qwen_text`, hold helpers several families share: the registry skips them)
    modules = {p.stem for p in (ROOT / "dit_distillery" / "families").glob("*.py") if not p.stem.startswith("_")}
    modules -= {"base"}
    assert set(families.names()) == {m for m in modules} and len(families.all()) == len(modules)
    for family in families.all():
        assert families.get(family.name) is family and families.get(family) is family
    with pytest.raises(DistilleryError) as err:
        families.get("no_such_family")
    assert err.value.field == "family" and "qwen_image" in err.value.fix


def test_presets_are_unique_across_families():
    seen_models, seen_loras = [], []
    for family in families.all():
        seen_models += list(family.presets())
        seen_loras += list(family.lora_presets)
    assert len(seen_models) == len(set(seen_models)) and len(seen_loras) == len(set(seen_loras))
    assert set(families.presets()) == set(seen_models) and set(families.lora_presets()) == set(seen_loras)


@pytest.mark.parametrize("name", families.names())
def test_every_family_meets_the_protocol(name):
    """Each fact of the family agrees with its own model and tiny pipeline."""
    family = families.get(name).check()
    pipe = family.tiny_pipeline(seed=0)
    dit = pipe.dit
    assert families.of_model(dit) is family and pipe.family == name and pipe.family_spec is family
    config = families.detect(dit)[1]
    assert family.latent_channels(config) == pipe.codec.latent_channels
    assert family.text_width(config) == pipe.prompt_encoder.width
    assert pipe.codec.spatial_factor == family.vae_factor
    assert family.schedule_template == pipe.template
    # detection from a bare checkpoint gives back the model's config (exactly, for the tiny configs we read)
    shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    assert family.is_family(shapes) and not any(f.is_family(shapes) for f in families.all() if f is not family)
    rebuilt = family.config_from_shapes(shapes.__getitem__, shapes)
    assert {k: tuple(v.shape) for k, v in families.get(name).model_class()(**rebuilt).state_dict().items()} == shapes
    # the block groups exist, with their lengths in the config
    groups = family.block_groups()
    assert family.main_group() in groups and not family.main_group().keep
    blocks = sum(len(getattr(dit, g.attr)) for g in groups)
    for g in groups:
        assert len(getattr(dit, g.attr)) == config[g.count_key]
    width, count, ffn = family.dims(config)
    assert count == blocks and width > 0 and ffn > 0
    assert family.describe(config) == f"width {width}, {blocks} blocks"
    # the velocity adapter keeps the latents' shape; image tokens follow the patch
    h, w = 2 * family.patch, 3 * family.patch
    x = torch.randn(1, pipe.codec.latent_channels, h, w)
    text = pipe.encode_prompts(["a red circle"])
    with torch.no_grad():
        v = family.velocity(dit, x, torch.tensor([0.5]), text)
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()
    assert family.image_tokens(h, w) == 6
    # meta-device example inputs run the model
    inputs = family.example_inputs(config, batch=1, h=h, w=w, text_tokens=3, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        dit(**inputs)
    # the default LoRA preset names Linears of the model; ComfyUI key maps round-trip
    from dit_distillery.lora_presets import resolve_targets

    assert resolve_targets(dit, family.default_lora_preset)
    state = dit.state_dict()
    back = family.from_comfy(family.to_comfy(dict(state)))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    loadable, why = family.comfy_loadable(config)
    assert isinstance(loadable, bool) and why
    assert set(family.sampling_defaults) == {"steps", "cfg_scale", "height", "width"}


def test_the_registry_and_the_cli_help_stay_light():
    """Listing families (the CLI's --help does) imports no heavy library."""
    import subprocess
    import sys

    probe = ("import sys, dit_distillery.families as f; f.all(); f.presets(); f.lora_presets(); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------------------
# One resolver

@pytest.mark.parametrize("name", families.names())
def test_detect_reads_every_kind_of_spec(name, tmp_path):
    from dit_distillery.models import registry

    family = families.get(name)
    preset, config = next(iter(family.presets().items()))
    assert families.detect(preset) == (name, config, f"preset {preset}")
    assert families.detect(preset.upper().replace("-", "_"))[:2] == (name, config)
    assert families.detect((name, config))[:2] == (name, config)
    assert families.detect({"family": name, "config": config})[:2] == (name, config)
    class_name = family.model_class().__name__
    assert families.detect({"_class_name": class_name, **config, "_diffusers_version": "0"})[:2] == (name, config)
    assert families.detect(dict(config))[:2] == (name, config)  # bare constructor arguments fit one family only
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": class_name, **config}))
    assert families.detect(path)[:2] == (name, config)
    assert families.detect(tmp_path)[:2] == (name, config)  # a transformer folder: its config.json
    tiny = family.tiny_config()
    model = family.model_class()(**tiny)
    saved = registry.save_dit(model, tmp_path / "dit.safetensors")
    assert families.detect(saved)[:2] == (name, registry.model_config(model))
    with TensorSource(saved) as src:
        assert families.detect(src)[:2] == (name, registry.model_config(model))
    assert families.detect(model)[:2] == (name, registry.model_config(model))
    bare = tmp_path / "bare.safetensors"  # no metadata: from the keys
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    assert families.detect(bare)[0] == name


def test_detect_refuses_what_it_cannot_tell(tmp_path):
    with pytest.raises(DistilleryError, match="no such file"):
        families.detect(tmp_path / "nope.safetensors", "dit")
    with pytest.raises(DistilleryError, match="not a DiT this pack knows"):
        families.detect({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(DistilleryError, match="cannot tell which DiT family"):
        families.detect({"no_such_argument": 1})
    with pytest.raises(DistilleryError) as err:
        families.detect(3.5, "model")
    assert err.value.field == "model"


# ----------------------------------------------------------------------------------------------------------
# What the nodes held, now in the core

def test_with_dit_swaps_only_the_dit():
    from dit_distillery.tiny import tiny_aaadit, tiny_pipeline

    pipe = tiny_pipeline("aaadit")
    pipe.template = "Qwen-Image-Lightning"  # a pipeline's own setting survives the swap
    dit = tiny_aaadit(pipe.prompt_encoder.width, pipe.codec.latent_channels, seed=5)
    other = pipe.with_dit(dit)
    assert other.dit is dit and other.prompt_encoder is pipe.prompt_encoder and other.codec is pipe.codec
    assert other.template == pipe.template and other.defaults == pipe.defaults
    assert other.defaults is not pipe.defaults  # the copy's settings are its own
    with pytest.raises(DistilleryError):  # the DiT must fit the encoder and codec
        pipe.with_dit(tiny_aaadit(pipe.prompt_encoder.width, 12))


def test_shrink_reuses_the_same_student_and_refuses_other_settings(tmp_path):
    from dit_distillery.families.qwen_image import tiny_config
    from dit_distillery.shrink import shrink
    from dit_distillery.shrink.synthetic import write_synthetic_source

    source = tmp_path / "source.safetensors"
    write_synthetic_source(source, tiny_config(num_layers=4), dtype=torch.float32)
    out = tmp_path / "student.safetensors"
    first = shrink(source, out, layers=2, reuse=True, overwrite=False)
    assert "reused" not in first and out.is_file()
    mtime = out.stat().st_mtime_ns
    again = shrink(source, out, layers=2, reuse=True, overwrite=False)
    assert again["reused"] is True and again["kept_blocks"] == first["kept_blocks"] and out.stat().st_mtime_ns == mtime
    with pytest.raises(DistilleryError, match="other settings") as err:  # another plan
        shrink(source, out, layers=3, reuse=True, overwrite=False, out_field="name")
    assert err.value.field == "name" and out.stat().st_mtime_ns == mtime
    with pytest.raises(DistilleryError, match="other settings"):  # the same plan in another dtype
        shrink(source, out, layers=2, dtype="bf16", reuse=True, overwrite=False)
    bf16 = shrink(source, out, layers=2, dtype="bf16", reuse=True, overwrite=True)
    assert "reused" not in bf16 and load_file(str(out))["img_in.weight"].dtype == torch.bfloat16
    assert shrink(source, out, layers=2, dtype="bf16", reuse=True)["reused"] is True


def test_build_aaadit_cli_and_node_share_one_builder(tmp_path):
    from dit_distillery.cli import main
    from dit_distillery.models import aaadit_presets

    cli_file = tmp_path / "cli.safetensors"
    assert main(["build-aaadit", "--preset", "tiny", "--seed", "3", "--single-file", str(cli_file)]) == 0
    core_file = tmp_path / "core.safetensors"
    config = aaadit_presets.preset_config("tiny")
    assert aaadit_presets.build_file(core_file, config, seed=3, provenance={"seed": 3}) is False
    cli, core = load_file(str(cli_file)), load_file(str(core_file))
    assert cli.keys() == core.keys() and all(torch.equal(cli[k], core[k]) for k in cli)
    mtime = core_file.stat().st_mtime_ns
    assert aaadit_presets.build_file(core_file, config, seed=3, provenance={"seed": 3}) is True  # reused
    assert core_file.stat().st_mtime_ns == mtime
    with pytest.raises(DistilleryError, match="other settings"):
        aaadit_presets.build_file(core_file, config, seed=4, provenance={"seed": 4})
    with pytest.raises(DistilleryError):  # the config is checked before anything is written
        aaadit_presets.build_file(tmp_path / "bad.safetensors", dict(config, num_heads=5), overwrite=True)
    assert not (tmp_path / "bad.safetensors").exists()


def test_key_maps_are_applied_when_saving_and_loading(tmp_path, monkeypatch):
    """A family's ComfyUI names (`to_comfy` / `from_comfy`, `lora_to_comfy` / `lora_from_comfy`) are what our files
    hold, and what loading and merging read back (here a renaming stands in for a family whose names differ)."""
    from dit_distillery.lora import add_lora, lora_weights_of, merge_lora, read_lora, save_lora
    from dit_distillery.models import registry
    from dit_distillery.tiny import tiny_aaadit

    def rename(mapping, old, new):
        return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in mapping.items()}

    cls = type(families.get("aaadit"))
    monkeypatch.setattr(cls, "to_comfy", lambda self, state: rename(state, "proj_out.", "final_layer.linear."))
    monkeypatch.setattr(cls, "from_comfy", lambda self, state: rename(state, "final_layer.linear.", "proj_out."))
    monkeypatch.setattr(cls, "lora_to_comfy", lambda self, modules: rename(modules, "blocks.", "layers."))
    monkeypatch.setattr(cls, "lora_from_comfy", lambda self, modules: rename(modules, "layers.", "blocks."))
    model = tiny_aaadit(seed=1)
    path = registry.save_dit(model, tmp_path / "dit.safetensors")
    stored = load_file(str(path))
    assert "final_layer.linear.weight" in stored and "proj_out.weight" not in stored
    back = registry.load_dit(path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())

    adapted = tiny_aaadit(seed=1)
    add_lora(adapted, "aaadit_attn", rank=2)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lora_file = save_lora(adapted, tmp_path / "lora.safetensors")
    assert all(k.startswith("layers.") for k in load_file(str(lora_file)))
    expected, merged = tiny_aaadit(seed=1), tiny_aaadit(seed=1)
    merge_lora(expected, lora_weights_of(adapted))  # our names, straight from the model
    merge_lora(merged, read_lora(lora_file))  # ComfyUI's names, from the file
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in expected.state_dict().items())
