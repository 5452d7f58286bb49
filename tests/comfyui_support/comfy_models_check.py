"""Pipeline from ComfyUI Models against ComfyUI itself, in ComfyUI's own Python (run by tests/test_comfy_models.py).

    COMFYUI_PYTHON comfy_models_check.py COMFYUI_DIR REPO WORK_DIR OUT.json

ComfyUI is imported as a library (CPU), our pack is loaded the way ComfyUI loads a custom node (its root
`__init__.py` by file location), and every comparison is made against ComfyUI's own nodes and functions
(CLIPTextEncode, VAEEncode, VAEDecode, `comfy.sd.load_lora_for_models` as LoraLoaderModelOnly,
`ModelPatcher.patch_model`). The models are small and random, built with ComfyUI's own classes:

* CLIP: ComfyUI's Qwen-Image text encoder (`CLIPType.QWEN_IMAGE`, Qwen2.5-VL) with a small Qwen2.5 config given
  through ComfyUI's own `qwen25_7b_model_config` model option (nothing patched; the 7B vision tower is allocated,
  never touched, so it costs no memory); ComfyUI's detection needs 4 KV heads of 128 (a 512-wide k_proj). The
  same weights also go through transformers' Qwen2.5-VL and diffusers' QwenImagePipeline encoding (Load
  Pipeline's path) with ComfyUI's tokenizer files, to compare templates and dropped prefixes;
* VAE: a random Wan 2.1 VAE at its real size (ComfyUI's VAE class fixes the architecture: 127M parameters);
* MODEL: ComfyUI's QwenImage model class with a small config (as Load Student builds MODELs; UNETLoader would
  fix the width to Qwen-Image's), made inside inference mode as ComfyUI's loaders run.

Writes a JSON report of measurements; the test module asserts on them.
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

COMFY, REPO, WORK, OUT = (Path(a) for a in sys.argv[1:5])
sys.path.insert(0, str(COMFY))

import torch  # noqa: E402

from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.float  # noqa: E402,F401
import comfy.lora  # noqa: E402,F401
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402,F401
import comfy.samplers  # noqa: E402,F401
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402,F401
import folder_paths  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py)

torch.manual_seed(0)
report: dict = {"timings": {}}
t0 = time.perf_counter()


def lap(name):
    global t0
    now = time.perf_counter()
    report["timings"][name] = round(now - t0, 2)
    t0 = now


# ComfyUI's folders for this run only (Train writes models/loras and output/)
for kind in ("loras", "diffusion_models", "vae", "text_encoders"):
    (WORK / "models" / kind).mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths[kind] = ([str(WORK / "models" / kind)],
                                                 folder_paths.folder_names_and_paths[kind][1])
folder_paths.set_output_directory(str(WORK / "output"))
folder_paths.set_temp_directory(str(WORK / "temp"))
folder_paths.set_input_directory(str(WORK / "input"))

spec = importlib.util.spec_from_file_location("dd_pack", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
pack = importlib.util.module_from_spec(spec)
sys.modules["dd_pack"] = pack
spec.loader.exec_module(pack)
Node = pack.NODE_CLASS_MAPPINGS
lap("import")

from dit_distillery.noise import initial_noise  # noqa: E402

TE = {"hidden_size": 512, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 4}
DIT = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
       "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": TE["hidden_size"],
       "axes_dims_rope": (4, 6, 6)}
PROMPTS = ["a red circle on a blue background", "a cat"]


def randomised(state, seed, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * std + (1.0 if k.endswith("norm.weight") or ".norm" in k and
                                                             k.endswith("weight") else 0.0)).to(v.dtype)
            for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------------
# ComfyUI's objects
def make_clip():
    import comfy.ops
    import comfy.text_encoders.llama as llama

    config = llama.Qwen25_7BVLI_Config(**TE)
    body = llama.Llama2_(config, device="cpu", dtype=torch.float32, ops=comfy.ops.manual_cast)
    state = {"model." + k: v for k, v in randomised(body.state_dict(), 1).items()}
    with torch.inference_mode():
        clip = comfy.sd.load_text_encoder_state_dicts([state], clip_type=comfy.sd.CLIPType.QWEN_IMAGE,
                                                      model_options={"qwen25_7b_model_config": dict(TE),
                                                                     "dtype": torch.float32})
    return clip, state


def diffusers_prompt_encoder(state):
    """The same weights in transformers' Qwen2_5_VLForConditionalGeneration behind our QwenImagePromptEncoder
    (diffusers' QwenImagePipeline encoding: its template, drop_idx 34), with ComfyUI's Qwen2.5 tokenizer files."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    from dit_distillery.text import QwenImagePromptEncoder

    text = dict(TE, vocab_size=152064, rms_norm_eps=1e-6, max_position_embeddings=128000,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1000000.0)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TE["hidden_size"],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
                  window_size=56)
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                  tie_word_embeddings=True)).eval()
    missing, unexpected = encoder.load_state_dict(
        {"model.language_model." + k[len("model."):]: v for k, v in state.items()}, strict=False)
    assert not unexpected and all(k.startswith(("model.visual.", "lm_head.")) for k in missing), (missing, unexpected)
    tokenizer = Qwen2Tokenizer.from_pretrained(COMFY / "comfy" / "text_encoders" / "qwen25_tokenizer")
    return QwenImagePromptEncoder(encoder, tokenizer)


def make_vae():
    import comfy.ldm.wan.vae as wan

    net = wan.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(2)  # ComfyUI's layers skip initialisation: fan-in scaled, unit norms

    def init(name, shape):
        if name.endswith("gamma"):
            return torch.ones(shape)
        if len(shape) < 2:
            return torch.zeros(shape)
        return torch.randn(shape, generator=g) / torch.tensor(shape[1:]).prod().float().sqrt()

    state = {k: init(k, tuple(v.shape)) for k, v in net.state_dict().items()}
    with torch.inference_mode():
        return comfy.sd.VAE(sd=state), state


def make_model(dtype=torch.float32, compute=None):
    """`dtype` fp8 with a compute dtype: as UNETLoader's weight_dtype fp8_e4m3fn (weights stored in fp8, cast per
    layer)."""
    mc = comfy.supported_models.QwenImage(dict(DIT))
    mc.set_inference_dtype(dtype, compute)
    with torch.inference_mode():  # as UNETLoader runs
        base = mc.get_model({})
        state = randomised(base.diffusion_model.state_dict(), 3, std=0.05)
        base.load_model_weights(state, "")
        return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                                offload_device=mm.unet_offload_device())


(clip, clip_state), (vae, vae_state), model = make_clip(), make_vae(), make_model()
lap("models")

with torch.inference_mode():
    pipeline, summary = Node["DD_PipelineFromComfyModels"]().build(model, clip, vae)
report["summary"] = summary
pipe = pipeline.load()

# ----------------------------------------------------------------------------------------------------------
# Text: our encoding (and the training cache) against CLIPTextEncode
text = {}
with torch.inference_mode():
    for prompt in PROMPTS:
        (cond,) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)
        text[prompt] = cond
ours = pipe.prompt_encoder.encode(PROMPTS)
report["text"] = []
for i, prompt in enumerate(PROMPTS):
    cond, extra = text[prompt][0]
    n = int(ours.mask[i].sum())
    report["text"].append({
        "comfy_shape": list(cond.shape), "comfy_mask": extra.get("attention_mask") is not None,
        "ours_tokens": n, "ours_mask_real_prefix": bool(ours.mask[i, :n].all()),
        "equal": bool(torch.equal(ours.embeds[i:i + 1, :n], cond)),
        "padding_zero": not bool(ours.embeds[i, n:].any())})
# the same weights through diffusers' Qwen-Image encoding (Load Pipeline's path): template and 34-token drop agree
reference = diffusers_prompt_encoder(clip_state).encode(PROMPTS)
report["diffusers_text"] = {"tokens": [int(m.sum()) for m in reference.mask], "drop_idx": 34,
                            "max_diff": float(max((reference.embeds[i, :n] - ours.embeds[i, :n]).abs().max()
                                                  for i, n in enumerate(int(m.sum()) for m in ours.mask))),
                            "scale": float(ours.embeds.abs().max())}
# the cache the trainer builds (images encoded by the VAE, prompts by the CLIP)
from PIL import Image  # noqa: E402

from dit_distillery.data import Resolution, build_cache, read_metadata  # noqa: E402

data = WORK / "data"
(data / "images").mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(5)
for i, prompt in enumerate(PROMPTS):
    arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(data / "images" / f"{i}.png")
(data / "metadata.csv").write_text("image,prompt\n" + "".join(f"images/{i}.png,{p}\n" for i, p in enumerate(PROMPTS)))
rows = read_metadata(data)
cache, _ = build_cache(list(rows), WORK / "cache", pipe.codec, pipe.prompt_encoder,
                       Resolution(32, 32, factor=pipe.size_multiple))
report["cache"] = []
for row in rows:
    item = cache.load(cache.key(row))
    cond = text[row.prompt][0][0]
    with torch.inference_mode():
        pixels = torch.tensor(__import__("numpy").asarray(Image.open(row.image).convert("RGB"))).float()[None] / 255
        (latent,) = comfy_nodes.VAEEncode().encode(vae, pixels)
    want = model.get_model_object("latent_format").process_in(latent["samples"])[:, :, 0]
    report["cache"].append({
        "embeds_equal": bool(torch.equal(item["embeds"][None], cond)),
        "mask_all_real": bool(item["mask"].all()) and item["mask"].shape[0] == cond.shape[1],
        "latents_max_diff": float((item["latents"][None] - want).abs().max())})
lap("text")

# ----------------------------------------------------------------------------------------------------------
# Images: our decode / encode against VAEDecode / VAEEncode, and against diffusers' Qwen-Image VAE
fmt = model.get_model_object("latent_format")
raw = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(6))
with torch.inference_mode():
    (image,) = comfy_nodes.VAEDecode().decode(vae, {"samples": raw})
ours_latent = fmt.process_in(raw)[:, :, 0]
decoded = pipe.decode(ours_latent)  # [1, 3, H, W] in [-1, 1]
comfy_pixels = image.permute(0, 3, 1, 2) * 2 - 1
report["decode"] = {"shape": list(decoded.shape), "comfy_shape": list(image.shape),
                    "max_diff": float((decoded - comfy_pixels).abs().max())}
with torch.inference_mode():
    (enc,) = comfy_nodes.VAEEncode().encode(vae, image)
ours_enc = pipe.codec.encode(decoded)
report["encode"] = {"max_diff": float((ours_enc - fmt.process_in(enc["samples"])[:, :, 0]).abs().max()),
                    "shape": list(ours_enc.shape)}
# diffusers' AutoencoderKLQwenImage with the same weights (our Load Pipeline path) decodes our latents alike
from diffusers import AutoencoderKLQwenImage  # noqa: E402

from dit_distillery import families  # noqa: E402
from dit_distillery.codecs import QwenImageVAECodec  # noqa: E402

qwen = families.get("qwen_image")
dvae = AutoencoderKLQwenImage()
dvae.load_state_dict(qwen.convert_vae_state(dict(vae_state), {}))
dcodec = QwenImageVAECodec(dvae.eval())
with torch.no_grad():
    report["diffusers_vae"] = {"decode_max_diff": float((dcodec.decode(ours_latent).clamp(-1, 1) - decoded).abs().max()),
                               "encode_max_diff": float((dcodec.encode(decoded) - ours_enc).abs().max()),
                               "latent_scale": float(ours_enc.abs().max())}
lap("vae")

# ----------------------------------------------------------------------------------------------------------
# Sampling: ComfyUI's sampler over the MODEL from our noise, against our Euler over our DiT (the MODEL's tensors)
seeds = [11, 12]
res = pipe.sample(PROMPTS, seeds=seeds, steps=3, cfg_scale=2.5, height=32, width=32, output="latent", record=[0, 2])
report["sample_materialised_by_sampling"] = pipe.materialised()
ref = pipe.with_dit(pipe.dit).sample(PROMPTS, seeds=seeds, steps=3, cfg_scale=2.5, height=32, width=32,
                                     output="latent", record=[0, 2])
noise = initial_noise(seeds, (16, 4, 4), out_dtype=torch.float32)
report["sample"] = {"max_diff": float((res.latents - ref.latents).abs().max()),
                    "scale": float(ref.latents.abs().max()),
                    "trajectory_max_diff": float((res.trajectory - ref.trajectory).abs().max()),
                    "starts_from_our_noise": bool(torch.equal(res.trajectory[:, 0], noise))}
model_state = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
ours_state = pipe.dit.state_dict()
report["alias"] = {"shared": sum(ours_state[k].data_ptr() == v.data_ptr()
                                 for k, v in model.model.diffusion_model.state_dict().items()),
                   "total": len(model_state),
                   "inference_tensors_in_ours": sum(v.is_inference() for v in ours_state.values())}
lap("sample")

# ----------------------------------------------------------------------------------------------------------
# Generate Distill Dataset and a LoRA training step (Direct Distill) with the real nodes: the MODEL never changes
with torch.inference_mode():  # as ComfyUI runs nodes
    dataset, _, gen_text = Node["DD_GenerateDistillDataset"]().generate(
        pipeline, "\n".join(PROMPTS), 0, 1, 21, 3, 2.5, "", 32, 32, 2, 1.0, "cpu", 2, "teacher", 1, True)
from safetensors.torch import load_file  # noqa: E402

row_latents = {}
for row in read_metadata(Path(dataset.spec["path"])):
    row_latents[row.prompt] = (row, load_file(row.latents)["latents"])
again = pipe.sample(PROMPTS, seeds=[21, 22], steps=3, cfg_scale=2.5, height=32, width=32, output="latent")
report["dataset"] = {"rows": len(row_latents), "report": gen_text,
                     "latents_equal": all(torch.equal(row_latents[p][1], again.latents[i]) for i, p in
                                          enumerate(PROMPTS)),
                     "seeds": [int(row_latents[p][0].seed) for p in PROMPTS]}
lap("dataset")

loss_node = Node["DD_DirectDistillLoss"]()
(loss,) = loss_node.__getattribute__(loss_node.FUNCTION)(**{k: v[1].get("default") for k, v in
                                                            loss_node.INPUT_TYPES()["required"].items()})
train = Node["DD_TrainLoRAFull"]()
widgets = {k: v[1].get("default") if isinstance(v[0], str) else v[1].get("default", v[0][0])
           for k, v in train.INPUT_TYPES()["required"].items() if k not in ("pipeline", "dataset", "loss")}
widgets.update(steps=2, lora_rank=4, output_name="comfy_lora", save_every=0, gradient_checkpointing=False,
               validation_prompts="", learning_rate=1e-2, init_lora="[none]")
with torch.inference_mode():
    trained, weights, history, _ = train.train(pipeline, dataset, loss, **widgets)
after = model.model.diffusion_model.state_dict()
report["train"] = {"steps": len(history["history"]), "weights": Path(weights).name,
                   "model_unchanged": all(torch.equal(after[k], v) for k, v in model_state.items()),
                   "loss": [h["loss"] for h in history["history"]]}
lap("train")

# Load Student on top: the trained LoRA merged into a copy of our DiT, as a pipeline and a ComfyUI MODEL
with torch.inference_mode():
    student, student_model, student_text = Node["DD_LoadStudent"]().load(
        pipeline, "[none]", "[none]", 1.0, "", trained_weights=weights)
student_pipe = student.load()
lora_out = student_pipe.sample(PROMPTS[:1], seeds=[3], steps=2, cfg_scale=1.0, height=32, width=32, output="latent")
base_out = pipe.sample(PROMPTS[:1], seeds=[3], steps=2, cfg_scale=1.0, height=32, width=32, output="latent")
trained_out = trained.load().sample(PROMPTS[:1], seeds=[3], steps=2, cfg_scale=1.0, height=32, width=32,
                                    output="latent")
report["student"] = {"text": student_text, "model": type(student_model).__name__,
                     "same_as_train_output": bool(torch.equal(lora_out.latents, trained_out.latents)),
                     "uses_our_sampler": student_pipe.sampler is None,
                     "differs_from_teacher": float((lora_out.latents - base_out.latents).abs().max()),
                     "model_unchanged": all(torch.equal(model.model.diffusion_model.state_dict()[k], v)
                                            for k, v in model_state.items())}
lap("student")

# ----------------------------------------------------------------------------------------------------------
# A LoRA on the MODEL (LoraLoaderModelOnly's call): our weights are ComfyUI's patched weights
lora = {}
gen = torch.Generator().manual_seed(9)
for block in range(DIT["num_layers"]):
    for m in ("attn.to_q", "attn.to_out.0", "img_mlp.net.2"):
        linear = dict(model.model.diffusion_model.named_modules())[f"transformer_blocks.{block}.{m}"]
        out_f, in_f = linear.weight.shape
        lora[f"transformer_blocks.{block}.{m}.lora_A.weight"] = torch.randn(4, in_f, generator=gen) * 0.1
        lora[f"transformer_blocks.{block}.{m}.lora_B.weight"] = torch.randn(out_f, 4, generator=gen) * 0.1
        lora[f"transformer_blocks.{block}.{m}.alpha"] = torch.tensor(8.0)
with torch.inference_mode():
    patched_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 0.75, 0)
    lpipeline, lsummary = Node["DD_PipelineFromComfyModels"]().build(patched_model, clip, vae)
lpipe = lpipeline.load()
ldit = lpipe.dit.state_dict()
check = patched_model.clone()
with torch.inference_mode():
    check.patch_model(device_to=torch.device("cpu"))
    comfy_weights = {k: v.clone() for k, v in check.model.diffusion_model.state_dict().items()}
    check.unpatch_model(device_to=torch.device("cpu"))
patched_keys = [k[len("diffusion_model."):] for k in patched_model.patches]
lres = lpipe.sample(PROMPTS[:1], seeds=[3], steps=3, cfg_scale=1.0, height=32, width=32, output="latent")
lref = lpipe.with_dit(lpipe.dit).sample(PROMPTS[:1], seeds=[3], steps=3, cfg_scale=1.0, height=32, width=32,
                                        output="latent")
plain = pipe.sample(PROMPTS[:1], seeds=[3], steps=3, cfg_scale=1.0, height=32, width=32, output="latent")
report["lora"] = {"summary": lsummary, "patched": len(patched_keys),
                  "equal_to_comfy": all(torch.equal(ldit[k], comfy_weights[k]) for k in ldit),
                  "patched_differ_from_base": all(not torch.equal(ldit[k], model_state[k]) for k in patched_keys),
                  "unpatched_shared": all(ldit[k].data_ptr() == after[k].data_ptr() for k in ldit
                                          if k not in patched_keys),
                  "sample_max_diff": float((lres.latents - lref.latents).abs().max()),
                  "lora_changes_sample": float((lres.latents - plain.latents).abs().max()),
                  "model_unchanged": all(torch.equal(model.model.diffusion_model.state_dict()[k], v)
                                         for k, v in model_state.items())}
lap("lora")

# fp8 weights (UNETLoader's weight_dtype fp8_e4m3fn): ComfyUI samples them cast per layer; our DiT shares them
fp8_model = make_model(torch.float8_e4m3fn, torch.float32)
with torch.inference_mode():
    fpipeline, _ = Node["DD_PipelineFromComfyModels"]().build(fp8_model, clip, vae)
fpipe = fpipeline.load()
fp8_state = fp8_model.model.diffusion_model.state_dict()
fdit = fpipe.dit.state_dict()
fres = fpipe.sample(PROMPTS[:1], seeds=[4], steps=3, cfg_scale=2.0, height=32, width=32, output="latent")
fref = fpipe.with_dit(fpipe.dit).sample(PROMPTS[:1], seeds=[4], steps=3, cfg_scale=2.0, height=32, width=32,
                                        output="latent")
report["fp8"] = {"stored": str(fp8_state["img_in.weight"].dtype), "ours": str(fdit["img_in.weight"].dtype),
                 "values_equal": all(torch.equal(fdit[k].float(), v.float()) for k, v in fp8_state.items()),
                 "fp8_shared": sum(fdit[k].data_ptr() == v.data_ptr() for k, v in fp8_state.items()
                                   if fdit[k].dtype == v.dtype),
                 "fp8_total": sum(v.dtype == fdit[k].dtype for k, v in fp8_state.items()),
                 "sample_max_diff": float((fres.latents - fref.latents).abs().max()),
                 "scale": float(fref.latents.abs().max())}
lap("fp8")

# Export Training Job refuses it by name
try:
    Node["DD_ExportTrainingJob"]().export(pipeline, dataset, loss, 1, "", **widgets)
    report["export"] = "accepted"
except Exception as exc:  # noqa: BLE001
    report["export"] = f"{type(exc).__name__}: {exc}"

OUT.write_text(json.dumps(report, indent=1, default=str))
