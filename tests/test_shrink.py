"""Shrink DiT on tiny random Qwen-Image DiTs: exact slices, loadable students, strategies, sources, dtypes."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_distillery.conditioning import TextEmbeds
from dit_distillery.formats import TensorSource
from dit_distillery.models import qwen_image, registry
from dit_distillery.shrink import Calibration, plan_shrink, shrink
from dit_distillery.shrink.plan import default_keep_first, parse_block_list, select_blocks

D, HD, H = 64, 16, 4  # tiny width, head dim, heads
FP8 = torch.float8_e4m3fn


def tiny_model(num_layers=6, seed=0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**qwen_image.tiny_config(num_layers=num_layers)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 6-block tiny Qwen-Image DiT saved with bare keys and no metadata (like a ComfyUI file)."""
    model = tiny_model()
    path = tmp_path_factory.mktemp("src") / "qwen_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def inputs(batch=2, size=8, text_len=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, size, size, generator=g)
    hidden = latents.reshape(batch, 16, size // 2, 2, size // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, 64)
    return dict(hidden_states=hidden, encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
                encoder_hidden_states_mask=torch.ones(batch, text_len, dtype=torch.bool),
                timestep=torch.tensor([0.3, 0.8][:batch]), img_shapes=[(1, size // 2, size // 2)] * batch)


# ------------------------------------------------------------------------------------------------ selection

def test_block_selection_strategies():
    assert select_blocks("uniform", 60, 30) == [int(i * 59 / 29 + 0.5) for i in range(30)]
    assert select_blocks("uniform", 60, 30)[0] == 0 and select_blocks("uniform", 60, 30)[-1] == 59
    assert len(set(select_blocks("uniform", 60, 59))) == 59
    assert select_blocks("uniform", 6, 3) == [0, 3, 5]
    assert select_blocks("first", 6, 3) == [0, 1, 5]
    assert select_blocks("interval", 60, 30) == list(range(10)) + list(range(40, 60))
    assert select_blocks("interval", 60, 30, keep_first=4) == list(range(4)) + list(range(34, 60))
    assert select_blocks("interval", 60, 30, keep_first=0) == list(range(30, 60))
    assert default_keep_first(30) == 10 and default_keep_first(2) == 1 and default_keep_first(1) == 0
    assert select_blocks("list", 60, None, keep_blocks="0-9, 50-59") == list(range(10)) + list(range(50, 60))
    assert select_blocks("list", 60, 3, keep_blocks=[59, 3, 1]) == [1, 3, 59]
    scores = [0.9, 0.1, 0.5, 0.05, 0.7, 0.0]
    assert select_blocks("importance", 6, 3, scores=scores) == [0, 4, 5]  # last kept even with the lowest score
    assert select_blocks("importance", 6, 1, scores=scores) == [5]
    assert select_blocks("uniform", 6, None) == list(range(6))
    assert parse_block_list("5,0-2", 6) == [0, 1, 2, 5]


# ------------------------------------------------------------------------------------------------ depth

def test_depth_student_blocks_are_source_blocks_and_forward_matches(source, tmp_path):
    path, model = source
    out = tmp_path / "student.safetensors"
    report = shrink(path, out, layers=3, strategy="first")
    assert report["kept_blocks"] == [0, 1, 5] and report["layers_after"] == 3
    src, dst = load_file(str(path)), load_file(str(out))
    for key, value in dst.items():
        if key.startswith("transformer_blocks."):
            i, rest = key.split(".", 2)[1:]
            src_key = f"transformer_blocks.{report['kept_blocks'][int(i)]}.{rest}"
        else:
            src_key = key
        assert value.dtype == src[src_key].dtype and torch.equal(value, src[src_key]), key
    assert len(dst) == len([k for k in src if not k.startswith("transformer_blocks.")]) + 3 * len(
        [k for k in src if k.startswith("transformer_blocks.0.")])
    assert report["params_after"] == sum(v.numel() for v in dst.values())
    assert report["params_before"] == sum(v.numel() for v in src.values())
    assert report["bytes_written"] == out.stat().st_size

    student = registry.load_dit(out)
    assert student.config.num_layers == 3
    skipped = copy.deepcopy(model)
    skipped.transformer_blocks = torch.nn.ModuleList([skipped.transformer_blocks[i] for i in report["kept_blocks"]])
    with torch.no_grad():
        assert torch.equal(student(**inputs()).sample, skipped(**inputs()).sample)

    with TensorSource(out) as t:  # provenance
        prov = t.metadata_value(registry.META_PROVENANCE)
        assert t.metadata_value(registry.META_CONFIG)["num_layers"] == 3
    assert prov["kept_blocks"] == [0, 1, 5] and prov["source"] == "qwen_tiny.safetensors"
    assert prov["strategy"] == "first" and prov["source_config"]["num_layers"] == 6 and prov["calibration"] is None


def test_comfyui_prefixed_and_sharded_sources_give_the_same_student(source, tmp_path):
    path, model = source
    reference = tmp_path / "ref.safetensors"
    shrink(path, reference, layers=4, heads=2)
    expected = load_file(str(reference))

    prefixed = tmp_path / "comfy.safetensors"
    sd = {"model.diffusion_model." + k: v.contiguous() for k, v in model.state_dict().items()}
    sd["first_stage_model.decoder.weight"] = torch.ones(3)  # an all-in-one checkpoint's other models are ignored
    save_file(sd, str(prefixed))
    sharded = tmp_path / "pipeline" / "transformer"
    model.save_pretrained(sharded, max_shard_size="300KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1 and list(sharded.glob("*.index.json"))
    for src in (prefixed, tmp_path / "pipeline"):
        out = tmp_path / f"from_{src.name}.safetensors"
        shrink(src, out, layers=4, heads=2)
        got = load_file(str(out))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_diffusers_folder_loads_with_from_pretrained(source, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    path, _ = source
    out, folder = tmp_path / "s.safetensors", tmp_path / "student_diffusers"
    shrink(path, out, layers=2, diffusers_folder=folder)
    loaded = QwenImageTransformer2DModel.from_pretrained(folder)
    assert loaded.config.num_layers == 2
    ours = registry.load_dit(out)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


# ------------------------------------------------------------------------------------------------ width

def _expected_width_slices(src, plan):
    """Independent statement of which rows/cols every student tensor takes (not the code under test)."""
    w = plan.width
    C = torch.tensor(w.channels)
    T, U = torch.tensor(w.temb), torch.tensor(w.temb_hidden)
    chunks = lambda k: torch.cat([C + j * D for j in range(k)])  # noqa: E731
    exp = {
        "time_text_embed.timestep_embedder.linear_1.weight": src["time_text_embed.timestep_embedder.linear_1.weight"][U],
        "time_text_embed.timestep_embedder.linear_1.bias": src["time_text_embed.timestep_embedder.linear_1.bias"][U],
        "time_text_embed.timestep_embedder.linear_2.weight": src["time_text_embed.timestep_embedder.linear_2.weight"][T][:, U],
        "time_text_embed.timestep_embedder.linear_2.bias": src["time_text_embed.timestep_embedder.linear_2.bias"][T],
        "txt_norm.weight": src["txt_norm.weight"],
        "img_in.weight": src["img_in.weight"][C], "img_in.bias": src["img_in.bias"][C],
        "txt_in.weight": src["txt_in.weight"][C], "txt_in.bias": src["txt_in.bias"][C],
        "norm_out.linear.weight": src["norm_out.linear.weight"][chunks(2)][:, T],
        "norm_out.linear.bias": src["norm_out.linear.bias"][chunks(2)],
        "proj_out.weight": src["proj_out.weight"][:, C], "proj_out.bias": src["proj_out.bias"],
    }
    for b, s in enumerate(plan.kept_blocks):
        S, P = f"transformer_blocks.{s}.", f"transformer_blocks.{b}."
        Q = torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in w.block_heads[b]])
        Ui, Ut = torch.tensor(w.img_units[b]), torch.tensor(w.txt_units[b])
        for mod in ("img_mod.1", "txt_mod.1"):
            exp[P + mod + ".weight"] = src[S + mod + ".weight"][chunks(6)][:, T]
            exp[P + mod + ".bias"] = src[S + mod + ".bias"][chunks(6)]
        for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            exp[P + f"attn.{m}.weight"] = src[S + f"attn.{m}.weight"][Q][:, C]
            exp[P + f"attn.{m}.bias"] = src[S + f"attn.{m}.bias"][Q]
        for m in ("to_out.0", "to_add_out"):
            exp[P + f"attn.{m}.weight"] = src[S + f"attn.{m}.weight"][C][:, Q]
            exp[P + f"attn.{m}.bias"] = src[S + f"attn.{m}.bias"][C]
        for m in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            exp[P + f"attn.{m}.weight"] = src[S + f"attn.{m}.weight"]
        for mlp, units in (("img_mlp", Ui), ("txt_mlp", Ut)):
            exp[P + f"{mlp}.net.0.proj.weight"] = src[S + f"{mlp}.net.0.proj.weight"][units][:, C]
            exp[P + f"{mlp}.net.0.proj.bias"] = src[S + f"{mlp}.net.0.proj.bias"][units]
            exp[P + f"{mlp}.net.2.weight"] = src[S + f"{mlp}.net.2.weight"][C][:, units]
            exp[P + f"{mlp}.net.2.bias"] = src[S + f"{mlp}.net.2.bias"][C]
    return exp


def test_width_slices_are_exact_and_student_loads_from_metadata(source, tmp_path):
    path, _ = source
    plan = plan_shrink(path, layers=4, heads=2)
    w = plan.width
    assert w.width == 32 and len(w.channels) == 32 and all(len(u) == 128 for u in w.img_units + w.txt_units)
    assert all(len(h) == 2 and h == sorted(h) for h in w.block_heads) and w.channels == sorted(w.channels)
    out = tmp_path / "narrow.safetensors"
    report = shrink(path, out, layers=4, heads=2)
    assert report["kept_heads"] == w.block_heads and report["width_after"] == 32 and report["heads_after"] == 2
    src, dst = load_file(str(path)), load_file(str(out))
    expected = _expected_width_slices(src, plan)
    assert set(dst) == set(expected)
    for k, v in dst.items():
        assert torch.equal(v, expected[k]), k
    with TensorSource(out) as t:
        family, config = registry.detect(t)  # from the metadata alone
        prov = t.metadata_value(registry.META_PROVENANCE)
    assert family == "qwen_image" and config == plan.config
    assert config["num_attention_heads"] == 2 and config["num_layers"] == 4 and config["attention_head_dim"] == HD
    assert prov["kept_channels"] == w.channels and prov["kept_heads"] == w.block_heads
    assert prov["channel_selection"] == "magnitude"
    student = registry.load_dit(out)
    assert student.inner_dim == 32 and len(student.transformer_blocks) == 4
    with torch.no_grad():
        y = student(**inputs()).sample
    assert y.shape == (2, 16, 64) and torch.isfinite(y).all()


def test_magnitude_keeps_the_heaviest_heads_units_and_channels(tmp_path):
    model = tiny_model(num_layers=3)
    with torch.no_grad():
        model.img_in.weight[[5, 17]] *= 50
        model.txt_in.weight[[5, 17]] *= 50
        for blk in model.transformer_blocks:
            for m in (blk.attn.to_q, blk.attn.to_k, blk.attn.to_v):
                m.weight[3 * HD:4 * HD] *= 10
            blk.img_mlp.net[0].proj.weight[7] *= 30
            blk.txt_mlp.net[0].proj.weight[9] *= 30
        model.time_text_embed.timestep_embedder.linear_2.weight[11] *= 40
    path = tmp_path / "heavy.safetensors"
    registry.save_dit(model, path)
    plan = plan_shrink(path, heads=1)
    w = plan.width
    assert {5, 17} <= set(w.channels) and 11 in w.temb
    assert all(h == [3] for h in w.block_heads)
    assert all(7 in u for u in w.img_units) and all(9 in u for u in w.txt_units)
    assert plan.kept_blocks == [0, 1, 2] and plan.calibration is None


# ------------------------------------------------------------------------------------------------ importance

def test_importance_drops_blocks_that_do_not_change_the_image_stream(tmp_path):
    model = tiny_model(num_layers=6)
    with torch.no_grad():  # zero the image stream's two gates in blocks 2 and 3: they pass image tokens through
        for i in (2, 3):
            mod = model.transformer_blocks[i].img_mod[1]
            for chunk in (2, 5):
                mod.weight[chunk * D:(chunk + 1) * D] = 0
                mod.bias[chunk * D:(chunk + 1) * D] = 0
    path = tmp_path / "lazy.safetensors"
    registry.save_dit(model, path)
    out = tmp_path / "imp.safetensors"
    report = shrink(path, out, layers=4, strategy="importance")
    scores = report["block_scores"]
    assert len(scores) == 6 and scores[2] < 1e-6 and scores[3] < 1e-6 and min(scores[:2] + scores[4:]) > 1e-3
    assert report["kept_blocks"] == [0, 1, 4, 5]
    assert report["calibration"] == "proxy" and any("PROXY" in n for n in report["notes"])
    with TensorSource(out) as t:
        prov = t.metadata_value(registry.META_PROVENANCE)
    assert prov["block_scores"] == pytest.approx(scores) and prov["calibration"] == "proxy"


def test_importance_width_follows_activations_and_ignores_padding(tmp_path):
    model = tiny_model(num_layers=3)
    with torch.no_grad():
        model.img_in.weight[9] *= 100  # residual channel 9 carries large activations everywhere
        model.img_in.bias[9] = 20
        for blk in model.transformer_blocks:
            blk.attn.to_v.weight[1 * HD:2 * HD] *= 20  # head 1's values (hence outputs) are large
            blk.attn.add_v_proj.weight[1 * HD:2 * HD] *= 20
            blk.img_mlp.net[0].proj.bias[11] = 30  # unit 11's GELU output is large
    path = tmp_path / "act.safetensors"
    registry.save_dit(model, path)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    embeds = torch.randn(2, 6, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    cal = Calibration(latents, TextEmbeds(embeds, mask), torch.tensor([0.4, 0.9]))
    plan = plan_shrink(path, layers=2, strategy="importance", heads=1, width_method="importance", calibration=cal)
    w = plan.width
    assert plan.calibration == "provided" and not any("PROXY" in n for n in plan.notes)
    assert 9 in w.channels and all(h == [1] for h in w.block_heads) and all(11 in u for u in w.img_units)
    # padded text positions are masked out of attention and of every statistic
    embeds2 = embeds.clone()
    embeds2[0, 4:] = 1000
    plan2 = plan_shrink(path, layers=2, strategy="importance", heads=1, width_method="importance",
                        calibration=Calibration(latents, TextEmbeds(embeds2, mask), torch.tensor([0.4, 0.9])))
    assert plan2.block_scores == pytest.approx(plan.block_scores, rel=1e-9, abs=1e-12)
    assert plan2.width.channels == w.channels and plan2.width.txt_units == w.txt_units


# ------------------------------------------------------------------------------------------------ dtypes

def test_fp8_source_kept_or_converted(source, tmp_path):
    path, model = source
    sd = {k: (v.to(FP8) if v.ndim == 2 else v.to(torch.bfloat16)) for k, v in model.state_dict().items()}
    fp8 = tmp_path / "qwen_fp8_e4m3fn.safetensors"
    save_file(sd, str(fp8))
    plan = plan_shrink(fp8, layers=4, heads=2)
    src = load_file(str(fp8))
    expected = _expected_width_slices({k: v.view(torch.uint8) if v.dtype == FP8 else v for k, v in src.items()}, plan)

    shrink(fp8, tmp_path / "k.safetensors", layers=4, heads=2)
    kept = load_file(str(tmp_path / "k.safetensors"))
    for k, v in kept.items():
        assert v.dtype == src_dtype(src, plan, k)
        assert torch.equal(v.view(torch.uint8) if v.dtype == FP8 else v, expected[k]), k

    shrink(fp8, tmp_path / "b.safetensors", layers=4, heads=2, dtype="bf16")
    conv = load_file(str(tmp_path / "b.safetensors"))
    for k, v in conv.items():
        exact = expected[k].view(FP8) if src_dtype(src, plan, k) == FP8 else expected[k]
        assert v.dtype == torch.bfloat16 and torch.equal(v, exact.to(torch.bfloat16)), k
    student = registry.load_dit(tmp_path / "k.safetensors", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(student(**inputs()).sample).all()


def src_dtype(src, plan, student_key):
    if student_key.startswith("transformer_blocks."):
        i, rest = student_key.split(".", 2)[1:]
        return src[f"transformer_blocks.{plan.kept_blocks[int(i)]}.{rest}"].dtype
    return src[student_key].dtype


def test_bf16_source_to_fp8(source, tmp_path):
    path, model = source
    bf16 = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) * (5000 if k == "img_in.weight" else 1) for k, v in model.state_dict().items()},
              str(bf16))
    report = shrink(bf16, tmp_path / "f8.safetensors", layers=2, dtype="fp8")
    assert report["dtype"] == "float8_e4m3fn"
    src, got = load_file(str(bf16)), load_file(str(tmp_path / "f8.safetensors"))
    for k, v in got.items():
        s = src[k.replace("transformer_blocks.1.", "transformer_blocks.5.")]
        if v.ndim == 2:
            assert v.dtype == FP8 and torch.equal(v.view(torch.uint8), s.clamp(-448, 448).to(FP8).view(torch.uint8)), k
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, s), k
    assert torch.isfinite(got["img_in.weight"].float()).all()  # values beyond fp8's range saturate, not NaN


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_json_report_and_dry_run(source, tmp_path, capsys):
    from dit_distillery.cli import main

    path, _ = source
    out = tmp_path / "cli.safetensors"
    assert main(["shrink", str(path), "--out", str(out), "--keep-blocks", "0,2-3,5", "--heads", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kept_blocks"] == [0, 2, 3, 5] and report["strategy"] == "list"
    assert report["params_before"] > report["params_after"] > 0 and report["heads_after"] == 3
    assert registry.load_dit(out).config.num_layers == 4

    dry = tmp_path / "dry.safetensors"
    assert main(["shrink", str(path), "--layers", "4", "--strategy", "interval", "--json", "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kept_blocks"] == [0, 3, 4, 5] and not dry.exists()

    assert main(["shrink", str(path), "--out", str(dry), "--layers", "9", "--json"]) == 2
    error = json.loads(capsys.readouterr().out.splitlines()[0])["error"]
    assert error["field"] == "layers" and not dry.exists()
    assert main(["shrink", str(path), "--layers", "2"]) == 2 and "--out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ other families

def test_aaadit_shrinks_by_depth_through_shrink(tmp_path):
    """AAADiT (no width layout) goes through `shrink()` as a depth-only source: its blocks renumbered as exact
    copies, its config (heads from our metadata) kept, the student loads and runs; width is refused by name, and
    a kept-last-block message names AAADiT."""
    from dit_distillery import families
    from dit_distillery.errors import DistilleryError

    family = families.get("aaadit")
    torch.manual_seed(0)
    model = family.model_class()(**family.tiny_config(num_blocks=5, num_heads=4)).eval()
    path = registry.save_dit(model, tmp_path / "aaadit.safetensors")
    out = tmp_path / "aaadit_3.safetensors"
    report = shrink(path, out, layers=3, strategy="interval", dtype="bf16")
    assert report["kept_blocks"] == {"blocks": [0, 3, 4]} and report["heads_after"] == 4
    assert report["params_after"] < report["params_before"]
    student = registry.load_dit(out)
    config = registry.model_config(student)
    assert config == dict(registry.model_config(model), num_blocks=3)
    source, got = model.state_dict(), load_file(str(out))
    assert got.keys() == student.state_dict().keys()
    for key, value in got.items():
        if key.startswith("blocks."):
            index, rest = key[len("blocks."):].split(".", 1)
            key = f"blocks.{report['kept_blocks']['blocks'][int(index)]}.{rest}"
        assert value.dtype == torch.bfloat16 and torch.equal(value, source[key].to(torch.bfloat16)), key
    with torch.no_grad():
        x = student(**family.example_inputs(config, batch=1, h=4, w=4, text_tokens=3, device="cpu",
                                            dtype=torch.bfloat16))
    assert torch.isfinite((x[0] if isinstance(x, tuple) else x).float()).all()
    with pytest.raises(DistilleryError, match="by depth only") as info:
        shrink(path, tmp_path / "w.safetensors", heads=2)
    assert info.value.field == "heads"
    with pytest.raises(DistilleryError, match="last block of each AAADiT block stack"):
        shrink(path, tmp_path / "w.safetensors", strategy="list", keep_blocks="0,1")
    assert not (tmp_path / "w.safetensors").exists()
    with pytest.raises(DistilleryError, match="Qwen-Image's last block has a text branch that was never trained"):
        parse_block_list("0", 3, family=families.get("qwen_image"))  # the reason is Qwen-Image's own
