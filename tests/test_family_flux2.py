"""FLUX.2 [klein]: released sizes, the DiT call and sampling against diffusers' Flux2KleinPipeline, ComfyUI's key
names (BFL) for models and LoRAs, loading folders and single files, training and shrinking on the tiny family."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_distillery import families, schedule
from dit_distillery.errors import DistilleryError
from dit_distillery.families import flux2
from tests.test_nodes_common import fake_comfy  # noqa: F401  (fixture)

FAMILY = families.get("flux2")


@pytest.fixture(scope="module")
def pipe():
    return FAMILY.tiny_pipeline(seed=0)


def reference(pipe, is_distilled=False):
    """diffusers' own klein pipeline around the same components."""
    from diffusers import Flux2KleinPipeline

    enc = pipe.prompt_encoder
    ref = Flux2KleinPipeline(scheduler=schedule.scheduler("FLUX.2"), vae=pipe.codec.vae, text_encoder=enc.text_encoder,
                             tokenizer=enc.tokenizer, transformer=pipe.dit, is_distilled=is_distilled)
    ref.set_progress_bar_config(disable=True)
    return ref


# ----------------------------------------------------------------------------------------------------------
# The released models

@pytest.mark.parametrize("preset,params,double,single,text", [("flux2-klein-4b", flux2.KLEIN_4B_PARAMS, 5, 20, 7680),
                                                             ("flux2-klein-9b", flux2.KLEIN_9B_PARAMS, 8, 24, 12288)])
def test_released_configs_have_their_exact_parameter_counts(preset, params, double, single, text):
    name, config, _ = families.detect(preset)
    assert name == "flux2" and (config["num_layers"], config["num_single_layers"]) == (double, single)
    with torch.device("meta"):
        model = FAMILY.model_class()(**config)
    assert sum(p.numel() for p in model.parameters()) == params
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())  # klein has no biases
    assert FAMILY.text_width(config) == text and FAMILY.comfy_loadable(config)[0]
    # ComfyUI's flux2 detection (model_detection.py, v0.38.1) on our key names gives back the same model
    keys = {k: tuple(v.shape) for k, v in FAMILY.to_comfy({k: v for k, v in model.state_dict().items()}).items()}
    detected = comfy_detect(keys)
    assert {k: detected[k] for k in ("hidden_size", "num_heads", "depth", "depth_single_blocks", "context_in_dim",
                                     "in_channels", "guidance_embed")} == {
        "hidden_size": config["num_attention_heads"] * 128, "num_heads": config["num_attention_heads"], "depth": double,
        "depth_single_blocks": single, "context_in_dim": text, "in_channels": 128, "guidance_embed": False}
    # the Load Student node's explicit MODEL config is what ComfyUI's own detection builds from the file
    assert FAMILY.comfy_model_config(config) == ("Flux2", detected)


def comfy_detect(shapes: dict) -> dict:
    """ComfyUI's flux2 branch of `model_detection.detect_unet_config` (v0.38.1), transcribed."""

    def count_blocks(prefix):
        n = 0
        while any(k.startswith(prefix.format(n)) for k in shapes):
            n += 1
        return n

    assert "double_blocks.0.img_attn.norm.key_norm.scale" in shapes and "img_in.weight" in shapes
    assert "double_stream_modulation_img.lin.weight" in shapes  # -> image_model "flux2"
    config = {"image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": 48, "mlp_ratio": 3.0, "theta": 2000,
              "out_channels": 128, "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False,
              "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3]}
    patch_size = 1
    config["patch_size"] = patch_size
    config["in_channels"] = shapes["img_in.weight"][1] // (patch_size * patch_size)
    config["hidden_size"] = shapes["img_in.weight"][0]
    config["context_in_dim"] = shapes["txt_in.weight"][1]
    config["vec_in_dim"] = shapes["vector_in.in_layer.weight"][1] if "vector_in.in_layer.weight" in shapes else None
    config["num_heads"] = config["hidden_size"] // sum(config["axes_dim"])
    config["depth"] = count_blocks("double_blocks.{}.")
    config["depth_single_blocks"] = count_blocks("single_blocks.{}.")
    config["guidance_embed"] = "guidance_in.in_layer.weight" in shapes
    config["yak_mlp"] = "double_blocks.0.img_mlp.gate_proj.weight" in shapes
    config["txt_norm"] = "txt_norm.scale" in shapes
    return config


@pytest.mark.parametrize("preset", ["flux2-klein-tiny", "flux2-klein-4b"])
def test_closed_form_training_activations_are_a_close_lower_bound_of_the_measured(preset):
    from dit_distillery import report

    family, config = report.PRESETS[preset]
    r = report.size_report(preset, height=256, width=256, batch=2)
    assert r["setting"]["text_tokens"] == 512  # klein's prompts are always 512 tokens
    tokens = r["setting"]["image_tokens"] + r["setting"]["text_tokens"]
    for checkpointing, key in ((True, "checkpointing_bytes"), (False, "no_checkpointing_bytes")):
        estimate = report.training_activation_bytes(family, config, batch=2, tokens=tokens, checkpointing=checkpointing)
        assert 1.0 <= r["activations"]["full"][key] / estimate <= 1.6, (checkpointing, estimate)


# ----------------------------------------------------------------------------------------------------------
# Calling the DiT, sampling

def test_velocity_is_the_pipelines_denoising_step(pipe):
    """The transformer call inside Flux2KleinPipeline (its packing, ids and time input), captured by a hook, gives
    our velocity at the same latents and sigma."""
    ref = reference(pipe)
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("kwargs", kwargs)
        seen.setdefault("out", output[0])

    noise = torch.randn(1, 128, 3, 2, generator=torch.Generator().manual_seed(1))
    handle = pipe.dit.register_forward_hook(hook, with_kwargs=True)
    try:
        ref(prompt="a red circle", height=48, width=32, num_inference_steps=3, guidance_scale=1.0, latents=noise,
            max_sequence_length=32, text_encoder_out_layers=(1, 2, 3), output_type="latent")
    finally:
        handle.remove()
    sigma = seen["kwargs"]["timestep"]
    assert 0 < float(sigma) <= 1
    text = pipe.prompt_encoder.encode(["a red circle"])
    ours = FAMILY.velocity(pipe.dit, noise, sigma.float(), text)
    latent_ids = ref._prepare_latent_ids(noise)
    theirs = ref._unpack_latents_with_ids(seen["out"], latent_ids, 3, 2)
    assert torch.allclose(ours, theirs, atol=1e-6) and ours.abs().max() > 0.1
    # ... and a wrong packing would not pass: transposed latents give another velocity
    wrong = FAMILY.velocity(pipe.dit, noise.transpose(2, 3).reshape(noise.shape), sigma.float(), text)
    assert not torch.allclose(wrong, theirs, atol=1e-3)


@pytest.mark.parametrize("steps,cfg", [(2, 4.0), (2, 1.0)])
def test_sampling_equals_flux2_klein_pipeline(pipe, steps, cfg):
    """Prompt encoding (template, thinking off, layers, padding), the empirical-mu schedule, CFG with the empty
    negative prompt, and the codec's batch-norm / unpatchify: the same images as diffusers from the same noise."""
    ours = pipe.sample("a red circle", seeds=3, steps=steps, cfg_scale=cfg, height=32, width=48)
    noise = pipe.initial_noise([3], 32, 48)
    theirs = reference(pipe)(prompt="a red circle", height=32, width=48, num_inference_steps=steps,
                             guidance_scale=cfg, latents=noise, max_sequence_length=32,
                             text_encoder_out_layers=(1, 2, 3), output_type="pt").images
    assert torch.allclose(ours.pixels * 0.5 + 0.5, theirs, atol=1e-5) and ours.pixels.std() > 0.05
    mu = schedule.mu_for("FLUX.2", 2 * 3, steps)
    sched = schedule.scheduler("FLUX.2")
    sched.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).numpy(), mu=mu)
    assert ours.sigmas == pytest.approx(sched.sigmas[:-1].tolist())


def test_prompt_encoding_is_the_pipelines(pipe):
    from diffusers import Flux2KleinPipeline

    enc = pipe.prompt_encoder
    ours = enc.encode(["a red circle", "two blue squares on a white background"])
    theirs = Flux2KleinPipeline._get_qwen3_prompt_embeds(enc.text_encoder, enc.tokenizer,
                                                         ["a red circle", "two blue squares on a white background"],
                                                         max_sequence_length=32, hidden_states_layers=(1, 2, 3))
    assert ours.embeds.shape == (2, 32, 48) and torch.equal(ours.embeds, theirs)
    assert "<think>\n\n</think>" in enc.chat_text("x")  # thinking off, as klein
    assert not enc.trims_padding  # klein attends to the padding: it is kept


def test_defaults_schedule_and_sizes():
    assert FAMILY.sampling_defaults == dict(steps=50, cfg_scale=4.0, height=1024, width=1024)
    assert FAMILY.folder_defaults({"_class_name": "Flux2KleinPipeline", "is_distilled": True})["steps"] == 4
    assert FAMILY.folder_defaults({"_class_name": "Flux2KleinPipeline", "is_distilled": True})["cfg_scale"] == 1.0
    assert FAMILY.folder_defaults({"_class_name": "Flux2KleinPipeline"})["steps"] == 50
    assert FAMILY.folder_defaults({"_class_name": "QwenImagePipeline"}) is None
    # 1024x1024: 64x64 latent pixels of 128 channels, one token each; diffusers' mu at 4 steps
    assert FAMILY.image_tokens(64, 64) == 4096
    assert schedule.mu_for(FAMILY.schedule_template, 4096, 4) == pytest.approx(2.2912, abs=1e-4)
    assert schedule.sigmas(FAMILY.schedule_template, 4, image_seq_len=4096) == pytest.approx(
        [1.0, 0.9674, 0.9081, 0.7672], abs=1e-4)


# ----------------------------------------------------------------------------------------------------------
# ComfyUI names

def test_bfl_names_are_diffusers_own_conversion(pipe):
    """Our BFL names (to_comfy) read back through diffusers' single-file converter give the model exactly."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers as convert

    state = pipe.dit.state_dict()
    bfl = FAMILY.to_comfy(dict(state))
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in bfl and "img_in.weight" in bfl
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks", "x_embedder")) for k in bfl)
    back = convert({k: v.clone() for k, v in bfl.items()})
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # the final layer's modulation is stored (shift, scale): halves swapped
    w = state["norm_out.linear.weight"]
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"], torch.cat(w.chunk(2)[::-1]))
    # ComfyUI renames *_norm.scale to .weight: both read back
    renamed = {k.replace("_norm.scale", "_norm.weight"): v for k, v in bfl.items()}
    assert all(torch.equal(FAMILY.from_comfy(renamed)[k], state[k]) for k in state)


def test_fused_lora_equals_the_separate_loras():
    """lora_to_comfy's rank-3r qkv adapter on the fused weight = the q, k, v adapters on their weights, and
    lora_from_comfy gives back adapters with the same effect (different ranks and alphas, one part missing)."""
    from dit_distillery.lora import LoraModule

    g = torch.Generator().manual_seed(0)
    d, n = 16, 16

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    mods = {"transformer_blocks.0.attn.to_q": LoraModule(rand(2, n), rand(d, 2), 4.0),
            "transformer_blocks.0.attn.to_v": LoraModule(rand(3, n), rand(d, 3), 3.0),
            "transformer_blocks.0.attn.add_q_proj": LoraModule(rand(2, n), rand(d, 2), 2.0),
            "transformer_blocks.0.attn.add_k_proj": LoraModule(rand(2, n), rand(d, 2), 2.0),
            "transformer_blocks.0.attn.add_v_proj": LoraModule(rand(2, n), rand(d, 2), 2.0),
            "norm_out.linear": LoraModule(rand(2, n), rand(2 * d, 2), 2.0)}
    weights = {name: rand(m.up.shape[0], n) for name, m in mods.items()}
    weights["transformer_blocks.0.attn.to_k"] = rand(d, n)
    expected = {k: w + (mods[k].delta() if k in mods else 0) for k, w in weights.items()}
    fused = FAMILY.lora_to_comfy(mods)
    assert set(fused) == {"diffusion_model.double_blocks.0.img_attn.qkv", "diffusion_model.double_blocks.0.txt_attn.qkv",
                          "diffusion_model.final_layer.adaLN_modulation.1"}
    assert fused["diffusion_model.double_blocks.0.img_attn.qkv"].rank == 5
    assert fused["diffusion_model.double_blocks.0.txt_attn.qkv"].rank == 6
    assert fused["diffusion_model.double_blocks.0.txt_attn.qkv"].alpha == 6.0  # common scale 1 kept in alpha
    bfl_weights = FAMILY.to_comfy({k + ".weight": w for k, w in weights.items()})
    bfl_expected = FAMILY.to_comfy({k + ".weight": w for k, w in expected.items()})
    for name, m in fused.items():
        key = name[len("diffusion_model."):] + ".weight"
        assert torch.allclose(bfl_weights[key] + m.delta(), bfl_expected[key], atol=1e-5)
    back = FAMILY.lora_from_comfy(fused)
    for k, w in weights.items():
        if k in back:
            assert torch.allclose(w + back[k].delta(), expected[k], atol=1e-5)
        else:
            assert k not in mods
    assert set(mods) <= set(back)


def test_lora_files_load_in_comfyui_and_merge_back(pipe, tmp_path):
    """Every module of a saved LoRA is `diffusion_model.<name>` of a weight our ComfyUI-named model has (ComfyUI's
    generic LoRA key map), and merging the file equals merging the adapters."""
    import copy

    from dit_distillery.lora import add_lora, lora_weights_of, merge_lora, read_lora, save_lora

    adapted = copy.deepcopy(pipe.dit)
    add_lora(adapted, "flux2_klein", rank=2, alpha=3.0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_()
    path = save_lora(adapted, tmp_path / "lora.safetensors")
    stored = load_file(str(path))
    comfy_weights = {"diffusion_model." + k[: -len(".weight")] for k in FAMILY.to_comfy(pipe.dit.state_dict())}
    modules = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k[: -len(".alpha")] for k in stored}
    assert modules and modules <= comfy_weights and all(k.startswith("diffusion_model.") for k in stored)
    assert "diffusion_model.double_blocks.0.img_attn.qkv" in modules
    expected, merged = copy.deepcopy(pipe.dit), copy.deepcopy(pipe.dit)
    merge_lora(expected, lora_weights_of(adapted))
    merge_lora(merged, read_lora(path))
    for k, v in expected.state_dict().items():
        assert torch.allclose(v, merged.state_dict()[k], atol=1e-5), k


def test_comfy_loadable_students():
    base = dict(flux2.KLEIN_4B_CONFIG)
    assert FAMILY.comfy_loadable(dict(base, num_layers=3, num_single_layers=10))[0]  # depth
    assert FAMILY.comfy_loadable(dict(base, num_attention_heads=16))[0]  # whole heads, MLP 3x
    assert not FAMILY.comfy_loadable(dict(base, mlp_ratio=2.0))[0]
    assert not FAMILY.comfy_loadable(dict(base, attention_head_dim=64, axes_dims_rope=[16] * 4))[0]


# ----------------------------------------------------------------------------------------------------------
# Detection and loading

def test_detect_from_diffusers_and_bfl_keys(pipe, tmp_path):
    from dit_distillery.models import registry

    state = {k: v.contiguous() for k, v in pipe.dit.state_dict().items()}
    config = registry.model_config(pipe.dit)
    for name, tensors in (("diffusers", state), ("bfl", FAMILY.to_comfy(dict(state))),
                          ("comfy", {"model.diffusion_model." + k: v for k, v in FAMILY.to_comfy(dict(state)).items()})):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        family, found, _ = families.detect(path)
        assert family == "flux2" and found == config, name
        loaded = registry.load_dit(path)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    # a student with fewer blocks: counts read back
    smaller = FAMILY.model_class()(**dict(FAMILY.tiny_config(), num_layers=1, num_single_layers=3))
    shapes = {k: tuple(v.shape) for k, v in FAMILY.to_comfy(smaller.state_dict()).items()}
    assert FAMILY.config_from_shapes(shapes.__getitem__, shapes) == registry.model_config(smaller)
    gap = {k.replace("single_blocks.2.", "single_blocks.5."): v for k, v in shapes.items()}
    with pytest.raises(DistilleryError, match="contiguous"):
        FAMILY.config_from_shapes(gap.__getitem__, gap)


def test_a_diffusers_folder_and_comfyui_single_files_load(pipe, tmp_path):
    """A klein folder (model_index.json as diffusers writes it, no record of ours: klein's 512 tokens and layers
    9, 18, 27, and `is_distilled` for the defaults) and the files ComfyUI users keep: the DiT in BFL names, the
    text encoder weights, the VAE."""
    from transformers import Qwen3Model

    from dit_distillery import tiny
    from dit_distillery.models import registry
    from dit_distillery.pipelines.loading import META_KEY, load_pipeline, save_pipeline

    encoder = tiny.tiny_qwen3_encoder(pipe.prompt_encoder.tokenizer, hidden_size=16, num_layers=28, seed=5)
    folder = save_pipeline(pipe, tmp_path / "klein")
    encoder.save_pretrained(folder / "text_encoder")
    index = json.loads((folder / "model_index.json").read_text())
    del index[META_KEY]
    index.update(is_distilled=True, text_encoder=["transformers", "Qwen3ForCausalLM"])
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = load_pipeline(folder)
    assert loaded.family == "flux2" and loaded.defaults["steps"] == 4 and loaded.defaults["cfg_scale"] == 1.0
    enc = loaded.prompt_encoder
    assert (enc.max_length, enc.hidden_layers) == (512, (9, 18, 27)) and isinstance(enc.text_encoder, Qwen3Model)
    text = enc.encode(["a red circle"])
    assert text.embeds.shape == (1, 512, 48)
    out = loaded.sample("a red circle", steps=2, height=32, width=32, output="latent")
    assert out.latents.shape == (1, 128, 2, 2) and torch.isfinite(out.latents).all()

    # single files: the DiT as ComfyUI keeps it (BFL names), the text encoder's weights with its config folder,
    # the VAE file
    dit_file = registry.save_dit(pipe.dit, tmp_path / "flux-2-klein-tiny.safetensors")
    assert "double_blocks.0.img_attn.qkv.weight" in load_file(str(dit_file))
    vae_file = tmp_path / "flux2-vae.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.codec.vae.state_dict().items()}, str(vae_file))
    te_file = tmp_path / "qwen_3_8b.safetensors"  # ComfyUI's file: Qwen3ForCausalLM names, its LM head too
    te_state = {"model." + k: v.contiguous() for k, v in encoder.state_dict().items()}
    te_state["lm_head.weight"] = torch.randn(encoder.config.vocab_size, 16)
    save_file(te_state, str(te_file))
    singles = load_pipeline(None, dit=dit_file, text_encoder=te_file,
                            text_encoder_config=folder / "text_encoder", tokenizer=folder / "tokenizer", vae=vae_file,
                            vae_config=folder / "vae")
    assert singles.family == "flux2" and singles.defaults == FAMILY.sampling_defaults
    for a, b in ((singles.dit, pipe.dit), (singles.codec.vae, pipe.codec.vae), (singles.prompt_encoder.text_encoder,
                                                                                 encoder)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_tiny_flux2_is_a_builtin_pipeline():
    from dit_distillery.pipelines.loading import builtin_names, load_pipeline, source_family

    assert "tiny:flux2" in builtin_names() and source_family("tiny:flux2") == "flux2"
    assert load_pipeline("tiny:flux2").family == "flux2"


# ----------------------------------------------------------------------------------------------------------
# Sampling with the family's defaults, training through the trainer

def test_sampling_with_the_family_defaults(pipe):
    """The base's 50 steps with CFG 4 and the empty negative prompt (at a tiny size), and the distilled 4 steps."""
    base = pipe.with_dit(pipe.dit)
    base.defaults = dict(FAMILY.sampling_defaults, height=32, width=32)
    calls = []
    out = base.sample("a red circle", seeds=1, callback=lambda i, n, x: calls.append(n), output="latent")
    assert len(out.sigmas) == 50 and calls[-1] == 50 and out.latents.shape == (1, 128, 2, 2)
    assert torch.isfinite(out.latents).all()
    distilled = base.with_dit(pipe.dit)
    distilled.defaults = dict(flux2.DISTILLED_DEFAULTS, height=32, width=32)
    fast = distilled.sample("a red circle", seeds=1, output="latent")
    assert len(fast.sigmas) == 4 and not torch.allclose(fast.latents, out.latents[:1])


def _job(out, **overrides):
    from tests.trainer_helpers import make_job

    return make_job(out, model={"pipeline": "tiny:flux2"}, **overrides)


@pytest.fixture(scope="module")
def distill_data(tmp_path_factory, pipe):
    from dit_distillery.gen_dataset import generate_distill_dataset

    folder = tmp_path_factory.mktemp("flux2_distill")
    report = generate_distill_dataset(pipe, ["a red circle on a blue background", "a green square on a white background"],
                                      folder, teacher_steps=4, teacher_cfg=4.0, height=32, width=32, student_steps=2)
    assert report["rows_written"] == 2
    return folder


@pytest.mark.parametrize("loss", ["flow_matching", "direct_distill"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sft_and_direct_distill_train_and_save_comfyui_names(tmp_path, distill_data, pipe, loss, mode):
    from dit_distillery.lora import read_lora
    from dit_distillery.models import registry
    from dit_distillery.trainer import train

    data = {"path": str(distill_data), "synthetic": None} if loss == "direct_distill" else {}
    job = _job(tmp_path, mode=mode, steps=2, lora={"rank": 2}, loss={"kind": loss}, optim={"lr": 1e-3},
               data=data or {"synthetic": {"count": 4, "size": 32}})
    result = train(job)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    stored = load_file(str(result.weights))
    comfy = {"diffusion_model." + k for k in FAMILY.to_comfy(pipe.dit.state_dict())}
    if mode == "lora":  # every module is one stock ComfyUI maps (its `diffusion_model.<BFL name>.weight`)
        modules = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k[: -len(".alpha")] for k in stored}
        assert {m + ".weight" for m in modules} <= comfy and "diffusion_model.single_blocks.0.linear1" in modules
        assert read_lora(result.weights).rank == 6  # q, k, v of rank 2 fused into one adapter
    else:  # the trained DiT under the BFL names UNETLoader reads, loadable back
        assert {"diffusion_model." + k for k in stored} == comfy
        trained = registry.load_dit(result.weights)
        assert families.of_model(trained) is FAMILY
        assert any(not torch.equal(v, pipe.dit.state_dict()[k]) for k, v in trained.state_dict().items())


# ----------------------------------------------------------------------------------------------------------
# Shrinking by depth

def test_block_groups_see_the_image_tokens(pipe):
    """The image states `image_io` picks out of the last single-stream block ([text; image]) are what the output
    layer gets, and the double-stream block's are what the next block takes."""
    dit = pipe.dit
    single, double = FAMILY.group("single_transformer_blocks"), FAMILY.group("transformer_blocks")
    assert FAMILY.main_group() == single and not double.keep
    seen = {}

    def keep(name, g):
        def hook(module, args, kwargs, output):
            seen[name] = g.image_io(args, kwargs, output, 6)
        return hook

    handles = [dit.single_transformer_blocks[-1].register_forward_hook(keep("single", single), with_kwargs=True),
               dit.transformer_blocks[0].register_forward_hook(keep("double", double), with_kwargs=True),
               dit.transformer_blocks[1].register_forward_pre_hook(
                   lambda m, args, kwargs: seen.__setitem__("next", kwargs["hidden_states"]), with_kwargs=True),
               dit.norm_out.register_forward_pre_hook(lambda m, args: seen.__setitem__("out", args[0]))]
    try:
        with torch.no_grad():
            FAMILY.velocity(dit, torch.randn(1, 128, 2, 3), torch.tensor([0.7]), pipe.prompt_encoder.encode(["a"]))
    finally:
        for h in handles:
            h.remove()
    assert seen["single"][0].shape == (1, 6, 32) and torch.equal(seen["single"][1], seen["out"])
    assert torch.equal(seen["double"][1], seen["next"])


def test_depth_shrink_of_both_groups_keeps_exact_blocks_renumbered(pipe, tmp_path):
    from dit_distillery.models import registry
    from dit_distillery.shrink.blocks import drop_blocks

    source = FAMILY.model_class()(**dict(FAMILY.tiny_config(num_layers=3, num_single_layers=4),
                                         joint_attention_dim=48)).eval()
    student, kept_single = drop_blocks(source, layers=2, strategy="list", keep_blocks=[0, 3])
    student, kept_double = drop_blocks(student, layers=2, strategy="list", keep_blocks=[1, 2],
                                       group="transformer_blocks")
    assert (kept_single, kept_double) == ([0, 3], [1, 2])
    s, t = source.state_dict(), student.state_dict()
    for new, old in enumerate(kept_single):
        for k in (k for k in t if k.startswith(f"single_transformer_blocks.{new}.")):
            assert torch.equal(t[k], s[k.replace(f".{new}.", f".{old}.", 1)])
    for new, old in enumerate(kept_double):
        for k in (k for k in t if k.startswith(f"transformer_blocks.{new}.")):
            assert torch.equal(t[k], s[k.replace(f".{new}.", f".{old}.", 1)])
    assert all(torch.equal(t[k], s[k]) for k in t if "blocks." not in k)
    path = registry.save_dit(student, tmp_path / "student.safetensors")
    stored = load_file(str(path))
    detected = comfy_detect({k: tuple(v.shape) for k, v in stored.items()})
    assert (detected["depth"], detected["depth_single_blocks"]) == (2, 2)  # ComfyUI counts the renumbered blocks
    shrunk = dict(flux2.KLEIN_4B_CONFIG, num_layers=2, num_single_layers=2)
    with torch.device("meta"):
        real_width = FAMILY.to_comfy(FAMILY.model_class()(**shrunk).state_dict())
    assert FAMILY.comfy_model_config(shrunk) == ("Flux2", comfy_detect({k: tuple(v.shape) for k, v in
                                                                        real_width.items()}))
    assert not FAMILY.comfy_loadable(registry.model_config(student))[0]  # heads of 16: the Load Student node's
    x, sigma, text = torch.randn(1, 128, 2, 2), torch.tensor([0.5]), pipe.prompt_encoder.encode(["a"])
    with torch.no_grad():
        assert torch.equal(FAMILY.velocity(registry.load_dit(path), x, sigma, text), FAMILY.velocity(student, x, sigma,
                                                                                                    text))


@pytest.mark.parametrize("names", ["bfl", "diffusers"])
def test_streamed_depth_shrink_of_both_groups(pipe, tmp_path, names, monkeypatch):
    """shrink.depth streams a klein file (ComfyUI's BFL names or ours) block by block into a student under BFL
    names whose tensors are exactly those of the in-memory depth shrink; dropped blocks are never read."""
    from dit_distillery.models import registry
    from dit_distillery.shrink.blocks import drop_blocks
    from dit_distillery.shrink.depth import shrink_depth
    from dit_distillery.shrink.stream import RawReader

    source = FAMILY.model_class()(**FAMILY.tiny_config(num_layers=3, num_single_layers=4, joint_attention_dim=48))
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "source.safetensors"
    save_file(FAMILY.to_comfy(state) if names == "bfl" else state, str(path))
    calls, read = [], []
    get = RawReader.read
    monkeypatch.setattr(RawReader, "read", lambda self, key, into=None: read.append(key) or get(self, key, into))
    report = shrink_depth(path, tmp_path / "student.safetensors", strategy="list",
                          layers={"single_transformer_blocks": 2, "transformer_blocks": 1},
                          keep_blocks={"single_transformer_blocks": [1, 3], "transformer_blocks": [2]},
                          progress=lambda done, total: calls.append(total))
    assert report["kept_blocks"] == {"single_transformer_blocks": [1, 3], "transformer_blocks": [2]}
    assert (report["config"]["num_layers"], report["config"]["num_single_layers"]) == (1, 2) and calls
    dropped = ("single_blocks.0.", "single_blocks.2.", "double_blocks.0.", "double_blocks.1.",
               "single_transformer_blocks.0.", "single_transformer_blocks.2.", "transformer_blocks.0.",
               "transformer_blocks.1.")
    assert read and not any(k.startswith(dropped) for k in read)
    expected, _ = drop_blocks(source, layers=2, strategy="list", keep_blocks=[1, 3])
    expected, _ = drop_blocks(expected, layers=1, strategy="list", keep_blocks=[2], group="transformer_blocks")
    stored = load_file(report["path"])
    want = FAMILY.to_comfy(expected.state_dict())
    assert stored.keys() == want.keys() and all(torch.equal(stored[k], want[k]) for k in want)
    assert families.detect(report["path"])[1] == registry.model_config(expected)
    with pytest.raises(DistilleryError, match="already exists"):
        shrink_depth(path, report["path"], layers={"transformer_blocks": 1})
    half = shrink_depth(path, tmp_path / "bf16.safetensors", layers={"transformer_blocks": 2}, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in load_file(half["path"]).values())
    assert half["kept_blocks"] == {"transformer_blocks": [0, 2]}  # uniform keeps the last block last


# ----------------------------------------------------------------------------------------------------------
# Shrinking by width

DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"


def _klein_file(tmp_path, names, seed=4, **config):
    """A tiny klein DiT (weights drawn wide, so a mix-up of rows shows) saved under BFL or our names."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FAMILY.model_class()(**FAMILY.tiny_config(**config)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"klein_{names}.safetensors"
    save_file(FAMILY.to_comfy(state) if names == "bfl" else state, str(path))
    return path, state


def _expected_slices(state, width, slots, head_dim, dim, units):
    """Every student tensor (our names) as the source's rows and columns the width plan keeps, written out by hand
    from the FLUX.2 layout: [shift, scale, gate] chunks, q | k | v | gate | up rows, [attention | MLP] columns."""
    c, t, th = (torch.tensor(x) for x in (width.channels, width.temb, width.temb_hidden))

    def chunks(ix, n, size):
        return torch.cat([ix + k * size for k in range(n)])

    want = {
        "x_embedder.weight": state["x_embedder.weight"][c],
        "context_embedder.weight": state["context_embedder.weight"][c],
        "time_guidance_embed.timestep_embedder.linear_1.weight":
            state["time_guidance_embed.timestep_embedder.linear_1.weight"][th],
        "time_guidance_embed.timestep_embedder.linear_2.weight":
            state["time_guidance_embed.timestep_embedder.linear_2.weight"][t][:, th],
        "single_stream_modulation.linear.weight": state["single_stream_modulation.linear.weight"][chunks(c, 3, dim)][:, t],
        "norm_out.linear.weight": state["norm_out.linear.weight"][chunks(c, 2, dim)][:, t],
        "proj_out.weight": state["proj_out.weight"][:, c],
    }
    for m in ("img", "txt"):
        key = f"double_stream_modulation_{m}.linear.weight"
        want[key] = state[key][chunks(c, 6, dim)][:, t]
    placed = {SINGLE: 0, DOUBLE: 0}
    for slot, (attr, src) in enumerate(slots):
        r = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in width.block_heads[slot]])
        new, placed[attr] = placed[attr], placed[attr] + 1
        old = lambda m: state[f"{attr}.{src}.{m}.weight"]  # noqa: E731
        into = lambda m: f"{attr}.{new}.{m}.weight"  # noqa: E731
        if attr == SINGLE:
            u = torch.tensor(width.units["mlp"][slot])
            rows = torch.cat([r, r + dim, r + 2 * dim, 3 * dim + u, 3 * dim + units + u])
            want[into("attn.to_qkv_mlp_proj")] = old("attn.to_qkv_mlp_proj")[rows][:, c]
            want[into("attn.to_out")] = old("attn.to_out")[c][:, torch.cat([r, dim + u])]
            norms = ("attn.norm_q", "attn.norm_k")
        else:
            for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                want[into(f"attn.{m}")] = old(f"attn.{m}")[r][:, c]
            for m in ("to_out.0", "to_add_out"):
                want[into(f"attn.{m}")] = old(f"attn.{m}")[c][:, r]
            for ff, space in (("ff", "img_ffn"), ("ff_context", "txt_ffn")):
                u = torch.tensor(width.units[space][slot])
                want[into(f"{ff}.linear_in")] = old(f"{ff}.linear_in")[torch.cat([u, units + u])][:, c]
                want[into(f"{ff}.linear_out")] = old(f"{ff}.linear_out")[c][:, u]
            norms = ("attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")
        want.update({into(m): old(m) for m in norms})  # RMSNorm over one head: whole
    return want


@pytest.mark.parametrize("names", ["bfl", "diffusers"])
def test_width_shrink_keeps_exact_slices_in_the_sources_naming(pipe, tmp_path, names):
    """4 heads of 16 -> 2 and fewer blocks per stack: every student tensor is exactly the source's kept rows and
    columns (a BFL file's fused qkv and swapped final modulation included), the student keeps the source's naming,
    loads from its metadata and from its shapes alone, and predicts finite velocities for the tiny pipeline's
    prompts."""
    from dit_distillery.models import registry
    from dit_distillery.shrink import plan_shrink, shrink

    path, state = _klein_file(tmp_path, names, num_layers=3, num_single_layers=4, num_attention_heads=4,
                              joint_attention_dim=pipe.dit.config.joint_attention_dim)
    layers = f"{DOUBLE}=2,{SINGLE}=2"
    out = tmp_path / "narrow.safetensors"
    report = shrink(path, out, layers=layers, strategy="interval", heads=2)
    assert (report["heads_before"], report["heads_after"], report["width_before"], report["width_after"]) == (
        4, 2, 64, 32)
    assert report["kept_blocks"] == {SINGLE: [0, 3], DOUBLE: [0, 2]} and report["width_method"] == "magnitude"
    assert report["params_after"] < report["params_before"] / 3
    stored = load_file(str(out))
    assert any(k.startswith("double_blocks.") for k in stored) == (names == "bfl")  # the source's naming
    width = plan_shrink(path, layers=layers, strategy="interval", heads=2).width  # the plan the file was made from
    slots = [(SINGLE, i) for i in report["kept_blocks"][SINGLE]] + [(DOUBLE, i) for i in report["kept_blocks"][DOUBLE]]
    assert len(width.block_heads) == 4 and report["kept_heads"] == width.block_heads
    want = _expected_slices(state, width, slots, head_dim=16, dim=64, units=192)
    got = FAMILY.from_comfy(stored)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    student = registry.load_dit(out)
    config = registry.model_config(student)
    assert (config["num_attention_heads"], config["attention_head_dim"], config["mlp_ratio"]) == (2, 16, 3.0)
    assert (config["num_layers"], config["num_single_layers"]) == (2, 2)
    assert FAMILY.config_from_shapes(lambda k: tuple(stored[k].shape), stored) == config  # its shapes say the same
    x = torch.randn(1, 128, 2, 3)
    with torch.no_grad():
        v = FAMILY.velocity(student, x, torch.tensor([0.6]), pipe.prompt_encoder.encode(["a red fox"]))
    assert v.shape == x.shape and torch.isfinite(v).all()
    again = shrink(path, out, layers=layers, strategy="interval", heads=2, reuse=True, overwrite=False)
    assert again["reused"]


def test_width_shrunk_klein_at_head_size_128_is_what_comfyui_detects(tmp_path):
    """Whole heads of 128 and the FFN at 3x: ComfyUI's flux2 detection (transcribed) builds the narrow student from
    its BFL keys exactly as the Load Student node's config says, so stock UNETLoader loads it."""
    from dit_distillery.shrink import shrink

    path, _ = _klein_file(tmp_path, "bfl", num_layers=1, num_single_layers=1, num_attention_heads=2,
                          attention_head_dim=128, joint_attention_dim=16)
    out = tmp_path / "w.safetensors"
    report = shrink(path, out, heads=1)
    stored = {k: tuple(v.shape) for k, v in load_file(str(out)).items()}
    config = families.detect(str(out))[1]
    assert report["width_after"] == 128 and stored["double_blocks.0.img_mlp.0.weight"] == (768, 128)
    assert dict(config, timestep_guidance_channels=256) == dict(flux2.tiny_config(
        num_layers=1, num_single_layers=1, num_attention_heads=1, attention_head_dim=128, joint_attention_dim=16),
        timestep_guidance_channels=256)
    assert FAMILY.comfy_model_config(dict(config, timestep_guidance_channels=256))[1]["num_heads"] == 1
    detected = comfy_detect(stored)
    assert (detected["hidden_size"], detected["num_heads"], detected["depth"], detected["depth_single_blocks"]) == (
        128, 1, 1, 1)


def test_calibration_runner_measures_what_the_whole_model_does(pipe, tmp_path):
    """The block-by-block runner's block influence per stack equals the full model's (`shrink.blocks`, forward hooks
    on one whole forward), and importance scoring of blocks and width writes a working student."""
    from dit_distillery.conditioning import TextEmbeds
    from dit_distillery.models import registry
    from dit_distillery.shrink import Calibration, shrink
    from dit_distillery.shrink.blocks import block_influence
    from dit_distillery.shrink.depth import DepthSource

    path, state = _klein_file(tmp_path, "bfl", num_layers=2, num_single_layers=3, num_attention_heads=4,
                              joint_attention_dim=pipe.dit.config.joint_attention_dim)
    g = torch.Generator().manual_seed(0)
    cal = Calibration(torch.randn(2, 128, 3, 2, generator=g),
                      TextEmbeds(torch.randn(2, 5, pipe.dit.config.joint_attention_dim, generator=g), None),
                      torch.tensor([0.3, 0.8]))
    with DepthSource(path) as src:
        stats = FAMILY.width_layout.calibrate(src, cal)
    model = registry.load_dit(path)
    for attr in (DOUBLE, SINGLE):
        whole = block_influence(model, cal.latents, cal.sigmas, cal.text, group=attr)
        assert stats.block_scores[attr] == pytest.approx(whole, rel=1e-4, abs=1e-9)
    assert set(stats.units[(SINGLE, 0)]) == {"mlp"} and stats.heads[(DOUBLE, 1)].shape == (4,)
    out = tmp_path / "imp.safetensors"
    report = shrink(path, out, layers=f"{SINGLE}=2", strategy="importance", heads=3, width_method="importance",
                    calibration=cal)
    assert report["calibration"] == "provided" and set(report["block_scores"]) == {DOUBLE, SINGLE}
    assert report["kept_blocks"][SINGLE][-1] == 2 and len(report["kept_blocks"][SINGLE]) == 2
    x = torch.randn(1, 128, 2, 2)
    with torch.no_grad():
        v = FAMILY.velocity(registry.load_dit(out), x, torch.tensor([0.5]), pipe.prompt_encoder.encode(["a"]))
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_width_refusals_and_the_last_block_message_name_flux2(tmp_path):
    from dit_distillery.shrink import shrink

    path, _ = _klein_file(tmp_path, "bfl", num_layers=2, num_single_layers=2)
    for kwargs, field, words in [(dict(heads=3), "heads", "2 heads per block"),
                                 (dict(heads=0), "heads", "2 heads per block"),
                                 (dict(strategy="importance"), "layers", "number of blocks to keep"),
                                 (dict(strategy="list", keep_blocks=f"{SINGLE}=0"), "keep_blocks",
                                  "last block of each FLUX.2 [klein] block stack")]:
        with pytest.raises(DistilleryError) as info:
            shrink(path, tmp_path / "x.safetensors", **kwargs)
        assert info.value.field == field and words in str(info.value) and info.value.fix
        assert "text branch" not in str(info.value) and "Qwen" not in str(info.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_and_node_shrink_klein_by_width(tmp_path, capsys, fake_comfy):  # noqa: F811 (fixture)
    import shutil

    from dit_distillery.cli import main
    from tests.test_nodes_common import call

    path, _ = _klein_file(tmp_path, "bfl", num_layers=2, num_single_layers=3, num_attention_heads=4)
    out = tmp_path / "cli.safetensors"
    code = main(["shrink", str(path), "--out", str(out), "--layers", f"{SINGLE}=2", "--heads", "3", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["heads_after"] == 3 and report["kept_blocks"] == {SINGLE: [0, 2], DOUBLE: [0, 1]}
    assert families.detect(str(out))[1]["num_attention_heads"] == 3
    shutil.copy(path, fake_comfy.base / "models" / "diffusion_models" / "klein.safetensors")
    dit, text = call("DD_ShrinkDiT", source="klein.safetensors", target_blocks=0, block_list=f"{DOUBLE}=1",
                     heads=2, name="klein_narrow.safetensors")
    assert dit.family == "flux2" and (dit.config["num_attention_heads"], dit.config["num_layers"]) == (2, 1)
    assert "heads_after: 2" in text and "double_blocks.0.img_attn.qkv.weight" in load_file(dit.path)


def test_bfl_vae_file_loads(pipe, tmp_path):
    """BFL's FLUX.2 VAE file (ComfyUI's flux2-vae.safetensors): LDM names, quant convs inside the encoder and
    decoder, BatchNorm statistics: read into AutoencoderKLFlux2 exactly."""
    from dit_distillery.pipelines.loading import load_vae, save_pipeline
    from tests.test_family_z_image import _ldm_vae_state

    vae = pipe.codec.vae
    state = _ldm_vae_state(vae)
    state = {("encoder." + k if k.startswith("quant_conv.") else "decoder." + k if k.startswith("post_quant_conv.")
              else k): v for k, v in state.items()}
    assert "encoder.quant_conv.weight" in state and "bn.running_var" in state and "encoder.down.0.block.0.conv1.weight" in state
    path = tmp_path / "flux2-vae.safetensors"
    save_file(state, str(path))
    folder = save_pipeline(pipe, tmp_path / "pipe")
    loaded = load_vae(path, "flux2", config_dir=folder / "vae")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in vae.state_dict().items())
