"""Z-Image (families/z_image.py): the release config's exact size, detection under diffusers' and ComfyUI's names,
the velocity against diffusers' own ZImagePipeline, prompt encoding, VAE normalisation, block groups, ComfyUI key
maps for DiT files and LoRAs, loading from a folder and from single files, sampling and training on the tiny
family."""

import functools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_distillery import families, schedule
from dit_distillery.errors import DistilleryError
from dit_distillery.families import z_image
from dit_distillery.models import registry
from tests.test_nodes_common import fake_comfy  # noqa: F401  (fixture)

FAMILY = families.get("z_image")


@pytest.fixture(scope="module")
def pipe():
    return FAMILY.tiny_pipeline(seed=0)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# The model: release size, detection, config from shapes

def test_release_config_has_the_exact_parameter_count():
    from dit_distillery import report

    model = registry.build_empty("z_image", FAMILY.presets()["z-image"])
    assert _params(model) == z_image.Z_IMAGE_PARAMS == 6_154_908_736
    assert report.size_report("z-image")["params"] == 6_154_908_736
    assert families.detect("z-image")[:2] == ("z_image", z_image.Z_IMAGE_CONFIG)


def test_released_text_encoder_and_vae_configs_have_their_sizes():
    from diffusers import AutoencoderKL
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("meta"):
        encoder = Qwen3Model(Qwen3Config(**FAMILY.text_encoder_config()))
        vae = AutoencoderKL(**FAMILY.vae_config())
    assert _params(encoder) == 4_022_468_096  # Qwen3-4B without its (tied) LM head
    assert _params(vae) == 83_819_683  # FLUX.1's VAE
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.1159, 0.3611)


def test_detection_and_config_from_either_naming(pipe):
    dit = pipe.dit
    config = registry.model_config(dit)
    ours = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    comfy = {k: tuple(v.shape) for k, v in z_image.to_comfy(dit.state_dict()).items()}
    assert "layers.0.attention.qkv.weight" in comfy and "x_embedder.weight" in comfy
    for shapes in (ours, comfy):
        assert FAMILY.is_family(shapes)
        assert [f.name for f in families.all() if f.is_family(shapes)] == ["z_image"]
        assert FAMILY.config_from_shapes(shapes.__getitem__, shapes) == config
    # Lumina 2 shares ComfyUI's module but has no pad tokens: not ours
    lumina = {k: v for k, v in comfy.items() if not k.endswith("pad_token")}
    assert not FAMILY.is_family(lumina)
    gap = {k: v for k, v in ours.items() if not k.startswith("layers.0.")}
    with pytest.raises(DistilleryError, match="not contiguous"):
        FAMILY.config_from_shapes(gap.__getitem__, gap)


def test_comfy_names_are_what_diffusers_single_file_converter_reads(pipe):
    """Our `to_comfy` output, as an original checkpoint (ComfyUI prefix, unused norm_final), converts back to our
    exact tensors with diffusers' own converter, and `from_comfy` agrees with it."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    state = pipe.dit.state_dict()
    comfy = z_image.to_comfy(state)
    original = {"model.diffusion_model." + k: v.clone() for k, v in comfy.items()}
    original["model.diffusion_model.norm_final.weight"] = torch.ones(pipe.dit.dim)
    converted = convert_z_image_transformer_checkpoint_to_diffusers(original)
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    back = z_image.from_comfy(dict(comfy, **{"norm_final.weight": torch.ones(1)}))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


# ----------------------------------------------------------------------------------------------------------
# Calling the DiT: against diffusers' ZImagePipeline

def _reference(pipe):
    from diffusers import ZImagePipeline

    encoder = pipe.prompt_encoder
    return ZImagePipeline(scheduler=schedule.scheduler("Z-Image"), vae=pipe.codec.vae,
                          text_encoder=encoder.text_encoder, tokenizer=encoder.tokenizer, transformer=pipe.dit)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_velocity_and_schedule_match_zimage_pipeline(pipe, cfg):
    """Same latents, prompts and steps: our Euler loop over our velocity and the Z-Image schedule gives the latents
    diffusers' ZImagePipeline denoises to (diffusers' guidance_scale g = our cfg_scale - 1)."""
    from dit_distillery.sampling import euler_denoise
    from dit_distillery.velocity import predict_velocity

    prompts = ["a red circle on a blue background", "two green stars"]  # different lengths: masks exercised
    negative = ["a blurry photo", "a photo of a cat"]
    latents = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(1))
    ref = _reference(pipe)
    # (diffusers rewrites the lists it is given in place: give it copies)
    pos, neg = ref.encode_prompt(list(prompts), negative_prompt=list(negative), do_classifier_free_guidance=True)
    with torch.no_grad():
        want = ref(prompt_embeds=pos, negative_prompt_embeds=neg, latents=latents.clone(), height=64, width=48,
                   num_inference_steps=3, guidance_scale=cfg - 1, output_type="latent").images
    text, neg_text = pipe.encode_prompts(prompts), pipe.encode_prompts(negative)
    with torch.no_grad():
        got = euler_denoise(functools.partial(predict_velocity, pipe.dit), latents, schedule.sigmas("Z-Image", 3),
                            text, cfg_scale=cfg, negative_text=neg_text)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, latents, atol=1e-2)  # it did denoise


def test_velocity_is_the_negated_output_at_one_minus_sigma(pipe):
    text = pipe.encode_prompts(["a red circle"])
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        v = FAMILY.velocity(pipe.dit, x, torch.tensor([0.25]), text)
        out = pipe.dit([x[0].unsqueeze(1)], torch.tensor([0.75]), [text.embeds[0][text.mask[0]]], return_dict=False)[0]
    assert torch.allclose(v, -out[0].squeeze(1).unsqueeze(0), atol=1e-6)


def test_prompt_encoding_is_the_pipelines(pipe):
    encoder = pipe.prompt_encoder
    prompts = ["a red circle", "a large blue hexagon on a white background"]
    want = _reference(pipe).encode_prompt(list(prompts), do_classifier_free_guidance=False)[0]
    got = encoder.encode(prompts)
    assert got.mask.sum(1).tolist() == [len(w) for w in want]
    for i, w in enumerate(want):
        assert torch.equal(got.embeds[i][got.mask[i]], w)
    # the chat template without a think block, hidden state -2 (not the last), padding dropped
    text = encoder.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    ids = encoder.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        states = encoder.text_encoder(**ids, output_hidden_states=True).hidden_states
    one = encoder.encode(["x"])
    # (padded to 512 there, unpadded here: equal up to float rounding)
    assert torch.allclose(one.embeds[0], states[-2][0], atol=1e-5)
    assert not torch.allclose(one.embeds[0], states[-1][0], atol=1e-2)
    short = FAMILY.prompt_encoder(encoder.text_encoder, encoder.tokenizer, {"max_length": 5})
    assert short.encode(prompts).embeds.shape[1] == 5
    with pytest.raises(DistilleryError):
        FAMILY.prompt_encoder(encoder.text_encoder, encoder.tokenizer, {"max_length": 600})


def test_codec_uses_flux1_shift_and_scale(pipe):
    codec = pipe.codec
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = codec.vae.encode(images).latent_dist.mode()
        latents = codec.encode(images)
        assert torch.allclose(latents, (z - 0.1159) * 0.3611)
        assert torch.allclose(codec.decode(latents), codec.vae.decode(latents / 0.3611 + 0.1159).sample)
    assert (codec.latent_channels, codec.spatial_factor) == (16, 8)


# ----------------------------------------------------------------------------------------------------------
# Blocks, schedule, defaults

def test_only_the_main_layers_are_dropped(pipe):
    from dit_distillery.shrink.blocks import drop_blocks

    groups = {g.attr: g.keep for g in FAMILY.block_groups()}
    assert groups == {"layers": False, "noise_refiner": True, "context_refiner": True}
    big = z_image.tiny_dit(seed=3, n_layers=4)
    student, kept = drop_blocks(big, layers=2, strategy="first")
    assert kept == [0, 3] and len(student.layers) == 2 and len(student.noise_refiner) == 2
    src, dst = big.state_dict(), student.state_dict()
    assert torch.equal(dst["layers.1.feed_forward.w1.weight"], src["layers.3.feed_forward.w1.weight"])
    assert torch.equal(dst["context_refiner.1.attention.to_q.weight"], src["context_refiner.1.attention.to_q.weight"])
    for group in ("noise_refiner", "context_refiner"):
        with pytest.raises(DistilleryError, match="never dropped"):
            drop_blocks(big, layers=1, group=group)


def test_schedule_is_static_shift_3_and_turbo_defaults():
    n = 8
    want = [3 * s / (1 + 2 * s) for s in torch.linspace(1, 1 / n, n, dtype=torch.float64).tolist()]
    assert schedule.sigmas("Z-Image", n) == pytest.approx(want, abs=1e-6)
    assert schedule.sigmas("Z-Image", n, image_seq_len=4096) == schedule.sigmas("Z-Image", n)  # no resolution shift
    assert FAMILY.sampling_defaults == dict(steps=8, cfg_scale=1.0, height=1024, width=1024)
    assert schedule.template_for("z_image") == "Z-Image"


# ----------------------------------------------------------------------------------------------------------
# ComfyUI: what stock ComfyUI loads

def test_comfy_loadable_depth_yes_width_no():
    assert FAMILY.comfy_loadable(dict(z_image.Z_IMAGE_CONFIG))[0]
    assert FAMILY.comfy_loadable(dict(z_image.Z_IMAGE_CONFIG, n_layers=18))[0]
    narrow, why = FAMILY.comfy_loadable(dict(z_image.Z_IMAGE_CONFIG, dim=1920, n_heads=15, n_kv_heads=15))
    assert not narrow and "3840" in why
    assert not FAMILY.comfy_loadable(dict(z_image.Z_IMAGE_CONFIG, n_refiner_layers=1))[0]
    # Load Student's MODEL output: ComfyUI's ZImage class for what it builds, nothing for the rest
    name, unet = FAMILY.comfy_model_config(dict(z_image.Z_IMAGE_CONFIG, n_layers=18))
    assert name == "ZImage" and unet["n_layers"] == 18 and unet["dim"] == 3840
    assert FAMILY.comfy_model_config(dict(z_image.Z_IMAGE_CONFIG, dim=1920, n_heads=15, n_kv_heads=15)) is None


def _comfy_lora_keys(model) -> set[str]:
    """The LoRA module names ComfyUI's Lumina2 map accepts (comfy/lora.py: `diffusion_model.` + every diffusers
    weight name `z_image_to_diffusers` maps), here: every diffusers weight whose ComfyUI tensor our `to_comfy`
    writes (q/k/v as rows of the fused qkv)."""
    state = model.state_dict()
    comfy = set(z_image.to_comfy(state))
    accepted = set()
    for key in state:
        name = z_image.comfy_name(key)
        block, rest = z_image._split_block(key)
        if block is not None and rest.split(".")[:2] in (["attention", m] for m in ("to_q", "to_k", "to_v")):
            name = f"{block}attention.qkv.{rest.split('.', 2)[2]}"
        if key.endswith(".weight") and name in comfy:
            accepted.add("diffusion_model." + key[: -len(".weight")])
    return accepted


def test_lora_files_use_keys_comfyui_maps_and_read_back(tmp_path):
    from dit_distillery.lora import add_lora, merge_lora, read_lora, save_lora

    model = z_image.tiny_dit(seed=1)
    accepted = _comfy_lora_keys(model)
    names = add_lora(model, "z_image_all", rank=2, alpha=4)
    assert any(n.startswith("noise_refiner.") for n in names) and any(n.startswith("context_refiner.") for n in names)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    path = save_lora(model, tmp_path / "l.safetensors")
    keys = set(load_file(str(path)))
    modules = {k.rsplit(".", 2)[0] if k.endswith("_A.weight") or k.endswith("_B.weight") else k[: -len(".alpha")]
               for k in keys}
    assert modules and modules <= accepted and len(modules) == len(names)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")) for k in keys)
    # merging the file gives what peft computes
    x = [torch.randn(16, 1, 4, 4)]
    caps = [torch.randn(3, 32)]
    with torch.no_grad():
        want = model(x, torch.tensor([0.3]), caps, return_dict=False)[0][0]
    base = z_image.tiny_dit(seed=1)
    assert merge_lora(base, read_lora(path)) == len(names)
    with torch.no_grad():
        got = base(x, torch.tensor([0.3]), caps, return_dict=False)[0][0]
    assert torch.allclose(got, want, atol=1e-4)
    # diffusers' own Z-Image LoRA loader reads the same file (prefix and .alpha included)
    from diffusers import ZImagePipeline

    other = z_image.tiny_dit(seed=1)
    with torch.no_grad():
        plain = other(x, torch.tensor([0.3]), caps, return_dict=False)[0][0]
    ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=other).load_lora_weights(
        str(path))
    with torch.no_grad():
        by_diffusers = other(x, torch.tensor([0.3]), caps, return_dict=False)[0][0]
    assert torch.allclose(by_diffusers, want, atol=1e-4) and not torch.allclose(plain, want, atol=1e-2)


def test_a_fused_qkv_lora_in_comfy_names_splits_exactly():
    from dit_distillery.lora import LoraModule, LoraWeights, merge_lora

    model = z_image.tiny_dit(seed=2)
    d = model.dim
    fused = LoraModule(torch.randn(2, d), torch.randn(3 * d, 2), 2.0)
    out = LoraModule(torch.randn(2, d), torch.randn(d, 2), 2.0)
    weights = LoraWeights({"layers.1.attention.qkv": fused, "diffusion_model.layers.1.attention.out": out})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model, weights)
    after = model.state_dict()
    delta = torch.cat([after[f"layers.1.attention.{m}.weight"] - before[f"layers.1.attention.{m}.weight"]
                       for m in ("to_q", "to_k", "to_v")])
    assert torch.allclose(delta, fused.delta(), atol=1e-5)
    assert torch.allclose(after["layers.1.attention.to_out.0.weight"] - before["layers.1.attention.to_out.0.weight"],
                          out.delta(), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Loading: a diffusers folder, and the single files ComfyUI users keep

def _ldm_vae_state(vae) -> dict:
    """A diffusers AutoencoderKL's tensors under the original LDM names (ComfyUI's ae.safetensors layout)."""
    import re

    blocks = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        k = key
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                   lambda m: f"decoder.up.{blocks - 1 - int(m.group(1))}.block.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{blocks - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
        k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.").replace("conv_norm_out", "norm_out")
        k = k.replace("conv_shortcut", "nin_shortcut")
        for ours, theirs in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
            k = k.replace(f".attn_1.{ours}.", f".attn_1.{theirs}.")
        if ".attn_1." in k and k.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's 1x1 convolutions
        out[k] = value.contiguous()
    return out


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    from dit_distillery.pipelines.loading import save_pipeline

    folder = tmp_path_factory.mktemp("z") / "pipe"
    save_pipeline(pipe, folder)
    return folder


def test_loads_from_its_diffusers_folder(pipe, saved):
    from diffusers import ZImagePipeline

    from dit_distillery.pipelines.loading import load_pipeline

    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    scheduler = json.loads((saved / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["shift"], scheduler["use_dynamic_shifting"]) == (3.0, False)
    loaded = load_pipeline(saved)
    assert loaded.family == "z_image" and loaded.template == "Z-Image"
    want = pipe.sample("a red circle", seeds=1, steps=2, height=32, width=32, output="latent").latents
    got = loaded.sample("a red circle", seeds=1, steps=2, height=32, width=32, output="latent").latents
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    diffusers_pipe = ZImagePipeline.from_pretrained(saved)  # diffusers reads the same folder
    assert type(diffusers_pipe.transformer).__name__ == "ZImageTransformer2DModel"


def test_base_and_turbo_folders_get_their_own_sampling_defaults(saved, tmp_path):
    """The released folders differ in scheduler_config.json's shift (Turbo 3.0, Base 6.0): a Base folder samples
    50 steps at CFG 4 by default, Turbo 8 steps without CFG; a folder without a scheduler config is taken as Turbo."""
    import shutil

    from dit_distillery.pipelines.loading import load_pipeline

    assert FAMILY.sampling_defaults == z_image.TURBO_DEFAULTS == dict(steps=8, cfg_scale=1.0, height=1024, width=1024)
    found = {}
    for name, shift in (("Z-Image", 6.0), ("Z-Image-Turbo", 3.0), ("no-scheduler", None)):
        folder = tmp_path / name
        shutil.copytree(saved, folder)
        index = json.loads((folder / "model_index.json").read_text())
        del index["_dit_distillery"]["defaults"]  # as downloaded: no defaults of ours
        (folder / "model_index.json").write_text(json.dumps(index))
        if shift is None:
            shutil.rmtree(folder / "scheduler")
        else:
            config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
            (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(config, shift=shift)))
        found[name] = load_pipeline(folder).defaults
    assert found["Z-Image"] == z_image.BASE_DEFAULTS == dict(steps=50, cfg_scale=4.0, height=1024, width=1024)
    assert found["Z-Image-Turbo"] == found["no-scheduler"] == z_image.TURBO_DEFAULTS
    assert FAMILY.folder_defaults({"_class_name": "QwenImagePipeline"}, saved) is None
    assert load_pipeline(saved).defaults == json.loads((saved / "model_index.json").read_text())[
        "_dit_distillery"]["defaults"]  # our own folders keep what they were saved with


def test_loads_from_comfyui_single_files(pipe, saved, tmp_path, monkeypatch):
    """DiT in ComfyUI's names (with its prefix, no metadata), the text encoder as a Qwen3ForCausalLM file, the VAE
    in the original LDM layout: the same pipeline."""
    from dit_distillery.pipelines.loading import load_pipeline

    dit_file = tmp_path / "z_image_turbo_bf16.safetensors"
    comfy = z_image.to_comfy(pipe.dit.state_dict())
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in comfy.items()}, str(dit_file))
    te_file = tmp_path / "qwen_3_4b.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in pipe.prompt_encoder.text_encoder.state_dict().items()},
              str(te_file))
    vae_file = tmp_path / "ae.safetensors"
    save_file(_ldm_vae_state(pipe.codec.vae), str(vae_file))
    loaded = load_pipeline(None, dit=dit_file, text_encoder=te_file, text_encoder_config=saved / "text_encoder",
                           tokenizer=saved / "tokenizer", vae=vae_file, vae_config=saved / "vae")
    want = pipe.sample("a red circle", seeds=1, steps=2, height=32, width=32).pixels
    got = loaded.sample("a red circle", seeds=1, steps=2, height=32, width=32).pixels
    assert loaded.family == "z_image" and torch.allclose(got, want, atol=1e-5)
    assert loaded.defaults == FAMILY.sampling_defaults  # no model_index: the family's (Turbo's) defaults
    # a lone text-encoder file: the family knows its encoder's config (here the tiny one stands in for Qwen3-4B)
    tiny_config = json.loads((saved / "text_encoder" / "config.json").read_text())
    monkeypatch.setattr(type(FAMILY), "text_encoder_config", lambda self: tiny_config)
    alone = load_pipeline(None, dit=dit_file, text_encoder=te_file, tokenizer=saved / "tokenizer", vae=vae_file,
                          vae_config=saved / "vae")
    a, b = alone.encode_prompts(["a red circle"]), pipe.encode_prompts(["a red circle"])
    torch.testing.assert_close(a.embeds, b.embeds, rtol=1e-5, atol=1e-5)


def test_builtin_tiny_pipeline_by_name():
    from dit_distillery.pipelines.loading import builtin_names, load_pipeline

    assert "tiny:z_image" in builtin_names()
    assert load_pipeline("tiny:z_image").family == "z_image"


# ----------------------------------------------------------------------------------------------------------
# Sampling and training on the tiny family

def test_samples_with_the_family_schedule(pipe):
    result = pipe.sample(["a red circle", "a blue square"], seeds=[0, 1], steps=3, height=32, width=32)
    assert result.pixels.shape == (2, 3, 32, 32) and torch.isfinite(result.pixels).all()
    assert pipe.sigmas(3, 32, 32) == schedule.sigmas("Z-Image", 3)
    guided = pipe.sample("a red circle", seeds=0, steps=2, cfg_scale=3.0, negative_prompt="blurry", height=32,
                         width=32, output="latent").latents
    plain = pipe.sample("a red circle", seeds=0, steps=2, height=32, width=32, output="latent").latents
    assert not torch.allclose(guided, plain)


def _z_job(out, **overrides):
    from tests.trainer_helpers import make_job

    return make_job(out, model={"pipeline": "tiny:z_image"}, **overrides)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sft_trains_and_saves_comfy_keys(tmp_path, mode):
    from dit_distillery.lora import read_lora
    from dit_distillery.trainer import train

    result = train(_z_job(tmp_path, mode=mode, steps=3, lora={"rank": 2}))
    assert [h["step"] for h in result.history][-1] == 3 and all(torch.isfinite(torch.tensor(h["loss"]))
                                                             for h in result.history)
    stored = load_file(str(result.weights))
    if mode == "lora":
        model = z_image.tiny_dit()
        modules = {k.rsplit(".", 2)[0] for k in stored if k.endswith(".lora_A.weight")}
        assert modules and modules <= _comfy_lora_keys(model)
        assert {m.rsplit(".", 1)[-1] for m in modules} >= {"to_q", "to_k", "to_v", "w1", "w2", "w3"}
        assert read_lora(result.weights).modules
    else:  # a full student in ComfyUI's names, read back by our loader
        assert "layers.0.attention.qkv.weight" in stored and "x_embedder.weight" in stored
        assert families.of_model(registry.load_dit(result.weights)) is FAMILY


@pytest.fixture(scope="module")
def distill_data(pipe, tmp_path_factory):
    from dit_distillery.gen_dataset import generate_distill_dataset

    folder = tmp_path_factory.mktemp("zdd") / "data"
    generate_distill_dataset(pipe, ["a red circle on a blue background", "a green square on a white background"],
                             folder, teacher_steps=3, teacher_cfg=2.0, height=32, width=32, student_steps=2)
    return folder


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_direct_distill_trains(tmp_path, distill_data, mode):
    from dit_distillery.trainer import train

    result = train(_z_job(tmp_path / "run", mode=mode, steps=2, lora={"rank": 2},
                          data={"path": str(distill_data), "synthetic": None},
                          loss={"kind": "direct_distill", "steps": 2, "cfg": 1}))
    assert result.steps == 2 and result.weights.is_file()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


# ----------------------------------------------------------------------------------------------------------
# Shrink DiT (streamed): depth of the main layers, refiners kept

@pytest.mark.parametrize("naming", ["comfy", "diffusers"])
def test_streamed_depth_shrink_keeps_refiners_and_renumbers(tmp_path, naming):
    from diffusers import ZImageTransformer2DModel

    from dit_distillery.shrink import shrink
    from dit_distillery.shrink.blocks import drop_blocks

    model = z_image.tiny_dit(seed=4, n_layers=5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    source = tmp_path / "z_image_bf16.safetensors"
    if naming == "comfy":  # as ComfyUI users keep it: prefix, fused qkv, no metadata
        save_file({"model.diffusion_model." + k: v.contiguous() for k, v in z_image.to_comfy(state).items()},
                  str(source))
    else:
        save_file(state, str(source))
    out = tmp_path / "student.safetensors"
    report = shrink(source, out, layers=3, strategy="first", diffusers_folder=tmp_path / "folder")
    assert report["kept_blocks"] == [0, 1, 4] and (report["layers_before"], report["layers_after"]) == (5, 3)
    stored = load_file(str(out))
    src = load_file(str(source))
    prefix = "model.diffusion_model." if naming == "comfy" else ""
    qkv = "attention.qkv.weight" if naming == "comfy" else "attention.to_q.weight"
    assert torch.equal(stored[f"layers.2.{qkv}"], src[f"{prefix}layers.4.{qkv}"])  # exact slices, renumbered
    assert not any(k.startswith("layers.3.") for k in stored)
    for k in (f"noise_refiner.1.{qkv}", f"context_refiner.1.{qkv}", "cap_pad_token"):
        assert torch.equal(stored[k], src[prefix + k])
    want, kept = drop_blocks(model, layers=3, strategy="first")
    assert kept == [0, 1, 4]
    for loaded in (registry.load_dit(out), ZImageTransformer2DModel.from_pretrained(tmp_path / "folder")):
        got = loaded.state_dict()
        assert got.keys() == want.state_dict().keys()
        assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
    assert FAMILY.comfy_loadable(dict(z_image.Z_IMAGE_CONFIG, n_layers=report["layers_after"]))[0]


def test_streamed_shrink_refuses_a_student_narrower_than_its_timestep_embedding(tmp_path):
    from dit_distillery.shrink import shrink

    source = tmp_path / "z.safetensors"
    registry.save_dit(z_image.tiny_dit(n_layers=3), source)
    with pytest.raises(DistilleryError, match="at least 256 wide") as err:
        shrink(source, tmp_path / "s.safetensors", layers=2, heads=1)
    assert err.value.field == "heads" and not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("naming", ["comfy", "diffusers"])
def test_streamed_width_shrink_slices_layers_and_refiners_exactly(tmp_path, naming):
    """3 heads of 128 -> 2: every student tensor is the source's kept rows/columns (fused qkv: the kept heads inside
    each third), the refiners narrowed with their own heads, and the student runs; ComfyUI would not load it."""
    from diffusers import ZImageTransformer2DModel

    from dit_distillery.shrink import shrink

    model = z_image.tiny_dit(seed=6, n_layers=3, dim=384, n_heads=3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    source = tmp_path / "z.safetensors"
    save_file(z_image.to_comfy(state) if naming == "comfy" else state, str(source))
    out = tmp_path / "narrow.safetensors"
    report = shrink(source, out, layers=2, heads=2, diffusers_folder=tmp_path / "folder")
    assert (report["width_before"], report["width_after"]) == (384, 256) and report["heads_after"] == 2
    assert any("3840" in note for note in report["notes"])  # not loadable in stock ComfyUI, and it says so
    student = registry.load_dit(out)
    config = registry.model_config(student)
    assert (config["dim"], config["n_heads"], config["n_kv_heads"], config["n_layers"]) == (256, 2, 2, 2)
    provenance = _provenance(out)
    heads, channels = provenance["kept_heads"], provenance["kept_channels"]
    assert len(heads) == 2 + 2 + 2 and len(channels) == 256  # 2 kept layers, then 2 + 2 refiner blocks
    got = student.state_dict()
    c = torch.tensor(channels)

    def rows_of(hs):
        return torch.cat([torch.arange(h * 128, (h + 1) * 128) for h in hs])

    kept = report["kept_blocks"]
    for slot, (group, s, d) in enumerate([("layers", kept[0], 0), ("layers", kept[1], 1), ("noise_refiner", 0, 0),
                                          ("noise_refiner", 1, 1), ("context_refiner", 0, 0),
                                          ("context_refiner", 1, 1)]):
        r = rows_of(heads[slot])
        for m in ("to_q", "to_k", "to_v"):
            want = state[f"{group}.{s}.attention.{m}.weight"][r][:, c]
            assert torch.equal(got[f"{group}.{d}.attention.{m}.weight"], want)
        assert torch.equal(got[f"{group}.{d}.attention.to_out.0.weight"],
                           state[f"{group}.{s}.attention.to_out.0.weight"][c][:, r])
        assert torch.equal(got[f"{group}.{d}.attention_norm1.weight"], state[f"{group}.{s}.attention_norm1.weight"][c])
        w2 = state[f"{group}.{s}.feed_forward.w2.weight"][c]
        assert got[f"{group}.{d}.feed_forward.w2.weight"].shape == (256, z_image.ffn_units(256))
        assert all(any(torch.equal(col, w2[:, j]) for j in range(w2.shape[1]))
                   for col in got[f"{group}.{d}.feed_forward.w2.weight"].T[:3])
    assert torch.equal(got["x_pad_token"], state["x_pad_token"][:, c])
    assert torch.equal(got["t_embedder.mlp.2.weight"], state["t_embedder.mlp.2.weight"])  # 256 wide: kept whole
    assert torch.equal(got["layers.0.adaLN_modulation.0.weight"],
                       state[f"layers.{kept[0]}.adaLN_modulation.0.weight"][torch.cat([c + k * 384 for k in range(4)])])
    with torch.no_grad():
        out_ = student([torch.randn(16, 1, 4, 4)], torch.tensor([0.5]), [torch.randn(3, 32)], return_dict=False)[0]
    assert torch.isfinite(out_[0]).all()
    folder = ZImageTransformer2DModel.from_pretrained(tmp_path / "folder").state_dict()
    assert all(torch.equal(folder[k], v) for k, v in got.items())
    assert not FAMILY.comfy_loadable(config)[0]


def _provenance(path) -> dict:
    from dit_distillery.formats import TensorSource

    with TensorSource(path) as src:
        return src.metadata_value(registry.META_PROVENANCE)


def test_width_layout_index_spaces_are_the_familys():
    """The streamed shrinker's generalised spaces: heads, head size and width from the layout's config keys (Z-Image
    stores `dim` and `n_heads`, no head size), FFN unit spaces and their width from the layout."""
    from dit_distillery.shrink.plan import WidthScores, select_width

    layout = FAMILY.width_layout
    config = dict(z_image.Z_IMAGE_CONFIG)
    assert (layout.heads(config), layout.head_dim(config), layout.width(config)) == (30, 128, 3840)
    narrow = layout.with_heads(config, 15)
    assert (narrow["n_heads"], narrow["n_kv_heads"], narrow["dim"]) == (15, 15, 1920)
    assert layout.ffn_units(3840) == 10240 and layout.ffn_units(1920) == 5120
    scores = WidthScores(channels=torch.arange(8.0), temb=torch.arange(8.0), temb_hidden=torch.arange(8.0),
                         heads=[torch.tensor([0.0, 1.0])], units={"ffn": [torch.arange(21.0)]})
    plan = select_width(scores, 1, 4, "magnitude", layout.ffn_units)
    assert plan.width == 4 and plan.units["ffn"] == [list(range(11, 21))] and plan.block_heads == [[1]]
    qwen = families.get("qwen_image").width_layout  # Qwen-Image's defaults are unchanged
    assert qwen.ffn_spaces == ("img_ffn", "txt_ffn") and qwen.ffn_units(64) == 256


def test_shrink_dit_node_on_a_comfyui_z_image_file(fake_comfy):
    from tests.test_nodes_common import call

    model = z_image.tiny_dit(seed=5, n_layers=4)
    path = fake_comfy.base / "models" / "diffusion_models" / "z_tiny.safetensors"
    comfy = z_image.to_comfy({k: v.contiguous() for k, v in model.state_dict().items()})
    save_file({"model.diffusion_model." + k: v for k, v in comfy.items()}, str(path))
    dit, report = call("DD_ShrinkDiT", source="z_tiny.safetensors", target_blocks=2, name="z_2")
    assert dit.family == "z_image" and dit.config["n_layers"] == 2 and dit.config["n_refiner_layers"] == 2
    assert "kept_blocks: [0, 3]" in report and "heads_before: 2" in report
    assert "layers.1.attention.qkv.weight" in load_file(dit.path)
    with pytest.raises(DistilleryError, match="at least 256 wide"):
        call("DD_ShrinkDiT", source="z_tiny.safetensors", target_blocks=2, heads=1, name="z_narrow")
    pipe, _ = call("DD_LoadPipeline", source="tiny:z_image")
    assert pipe.load().family == "z_image"
