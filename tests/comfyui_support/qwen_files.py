"""ComfyUI's Qwen-Image template files as random-weight stand-ins with their real layouts, and a test pack.

The three files of ComfyUI's Qwen-Image template, under their names, written tensor by tensor (one tensor in
memory at a time), random values generated fast (windows of one random byte pool):

* `qwen_2.5_vl_7b_fp8_scaled.safetensors`: ComfyUI's "scaled fp8" text encoder. Its tensors are ComfyUI's own
  Qwen2.5-VL module (`Qwen25_7BVLI`, read from ComfyUI in its Python: `comfy_layouts`); every Linear weight of
  the text model and the vision tower in float8_e4m3fn with a float32 `<layer>.scale_weight` (358 of them in
  the real file), the `scaled_fp8` marker, embeddings, norms, biases and the patch embedding in bf16, and the
  untied `lm_head.weight` in bf16, which ComfyUI does not load (the published file is 9.38 GB; these tensors
  make 9.385 GB). fp8 bytes have the top exponent bit cleared: |value| <= 1.875, never NaN (0x7F / 0xFF).
* `qwen_image_fp8_e4m3fn.safetensors`: the DiT at its real width (3072, 24 heads of 128, text 3584, 64 in
  / 16 out channels) with fewer blocks, ComfyUI's key names, plain fp8: 2-D weights in float8_e4m3fn (values
  below 0.12), biases and norms in bf16.
* `qwen_image_vae.safetensors`: the Wan 2.1 VAE ComfyUI builds for it (its architecture is fixed: 127 M
  parameters), bf16, fan-in scaled random weights, unit norms.

`SUPPORT_PACK` is a custom-node pack for the test servers (never shipped): it lets the stock CLIPLoader build a
1-layer stand-in text encoder (ComfyUI fixes the 7B's 28 layers; see the pack's docstring) and adds
`DDProbe_Save`, which writes what the tests compare (CLIPTextEncode's conditioning, VAEDecode's images, our
pipeline's decode of a latents file) to `output/dd_probe/<name>.safetensors`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

DIT = "qwen_image_fp8_e4m3fn.safetensors"
TEXT_ENCODER = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE = "qwen_image_vae.safetensors"
F8 = torch.float8_e4m3fn
FULL_TE = {"num_hidden_layers": 28, "intermediate_size": 18944}  # Qwen2.5-VL-7B (ComfyUI's defaults)
VOCAB, TEXT_WIDTH = 152064, 3584
SCALED_MASK = 0xBF  # clears the top exponent bit: |x| <= 1.875 (RMS ~0.59), no NaN pattern
PLAIN_MASK = 0x9F  # clears the top two: |x| <= 0.117 (RMS ~0.05), weights that need no scale

_LAYOUTS = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True
import comfy.ops
import comfy.ldm.wan.vae as wan
import comfy.text_encoders.llama as llama
config = json.loads(sys.argv[2])
te = llama.Qwen25_7BVLI(config, torch.bfloat16, "meta", comfy.ops.manual_cast)
with torch.device("meta"):  # the Wan 2.1 VAE as comfy.sd.VAE builds it for Qwen-Image's file
    vae = wan.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
print("LAYOUTS" + json.dumps({name: [[k, list(v.shape)] for k, v in module.state_dict().items()]
                              for name, module in (("te", te), ("vae", vae))}))
"""


def comfy_layouts(comfyui_dir, python: str, te_config: dict | None = None) -> dict[str, list]:
    """The text encoder's (Qwen2.5-VL with `te_config` over the 7B's) and the VAE's tensor names and shapes, as
    ComfyUI's own modules have them (in ComfyUI's Python; on the meta device, so nothing is allocated)."""
    run = subprocess.run([python, "-c", _LAYOUTS, str(comfyui_dir), json.dumps(te_config or {})],
                         cwd=comfyui_dir, capture_output=True, text=True, timeout=300)
    line = next((l for l in run.stdout.splitlines() if l.startswith("LAYOUTS")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"reading ComfyUI's layouts failed:\n{run.stderr[-3000:]}")
    return {k: [(name, tuple(shape)) for name, shape in v] for k, v in json.loads(line[len("LAYOUTS"):]).items()}


class RandomBytes:
    """Random bytes, fast: windows at random offsets of one seeded pool (64 MiB)."""

    def __init__(self, seed: int, size: int = 1 << 26):
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=self.generator)

    def take(self, n: int, mask: int) -> torch.Tensor:
        size = self.pool.numel()
        start = int(torch.randint(0, size, (1,), generator=self.generator))
        reps = (start + n + size - 1) // size
        out = (self.pool.repeat(reps) if reps > 1 else self.pool)[start:start + n].clone()
        return out.bitwise_and_(mask)

    def fp8(self, shape, mask: int) -> torch.Tensor:
        return self.take(_numel(shape), mask).view(F8).reshape(shape)

    def values(self, shape, rms: float, dtype=torch.bfloat16) -> torch.Tensor:
        """Values with about this root mean square (fp8 bytes scaled; exact in bf16)."""
        return self.fp8(shape, SCALED_MASK).to(dtype).mul_(rms / 0.59)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _writer(path, layout):
    from dit_distillery.formats import StreamingSafetensorsWriter

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return StreamingSafetensorsWriter(path, layout)


def _is_scaled_linear(name: str, shape) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and name not in ("model.embed_tokens.weight",
                                                                       "lm_head.weight")


def write_text_encoder(path, te_layout, *, vision: bool = True, lm_head: bool = True, seed: int = 0) -> dict:
    """ComfyUI's scaled-fp8 Qwen2.5-VL file for `te_layout` (`comfy_layouts(...)["te"]`); returns its facts."""
    entries = [(k, s) for k, s in te_layout if vision or not k.startswith("visual.")]
    if lm_head:
        entries.append(("lm_head.weight", (VOCAB, TEXT_WIDTH)))
    layout, scaled = [("scaled_fp8", F8, (0,))], 0
    for name, shape in entries:
        if _is_scaled_linear(name, shape):
            layout += [(name, F8, shape), (name[: -len("weight")] + "scale_weight", torch.float32, ())]
            scaled += 1
        else:
            layout.append((name, torch.bfloat16, shape))
    rnd = RandomBytes(seed)
    with _writer(path, layout) as writer:
        for name, dtype, shape in layout:
            if name == "scaled_fp8":
                value = torch.empty(0, dtype=F8)
            elif name.endswith(".scale_weight"):  # weight x scale: RMS ~0.02 (the fp8 bytes' RMS is ~0.59)
                value = torch.tensor(0.034 * (0.8 + 0.4 * float(torch.rand((), generator=rnd.generator))))
            elif dtype == F8:
                value = rnd.fp8(shape, SCALED_MASK)
            elif len(shape) == 1 and "norm" in name:
                value = (1 + rnd.values(shape, 0.01, torch.float32)).to(torch.bfloat16)
            else:
                value = rnd.values(shape, 0.02 if len(shape) > 1 else 0.01)
            writer.write(name, value)
        total = writer.total_bytes
    return {"bytes": total, "scaled_layers": scaled, "tensors": len(layout)}


def write_dit(path, blocks: int = 2, seed: int = 1) -> dict:
    """The Qwen-Image DiT at its real width with `blocks` blocks, plain fp8 as ComfyUI's fp8_e4m3fn file."""
    from dit_distillery.shrink.stream import file_shapes
    from dit_distillery.shrink.synthetic import full_width_config

    shapes = file_shapes(full_width_config(blocks))
    layout = [(k, F8 if len(s) == 2 else torch.bfloat16, s) for k, s in shapes.items()]
    rnd = RandomBytes(seed)
    with _writer(path, layout) as writer:
        for name, dtype, shape in layout:
            if dtype == F8:
                value = rnd.fp8(shape, PLAIN_MASK)
            elif "norm" in name:
                value = (1 + rnd.values(shape, 0.01, torch.float32)).to(torch.bfloat16)
            else:
                value = rnd.values(shape, 0.01)
            writer.write(name, value)
        total = writer.total_bytes
    return {"bytes": total, "blocks": blocks, "tensors": len(layout)}


def write_vae(path, vae_layout, seed: int = 2) -> dict:
    """ComfyUI's Qwen-Image (Wan 2.1) VAE file: bf16, weights ~N(0, 1/fan_in), RMS-norm gammas 1, biases 0."""
    layout = [(k, torch.bfloat16, s) for k, s in vae_layout]
    rnd = RandomBytes(seed)
    with _writer(path, layout) as writer:
        for name, dtype, shape in layout:
            if name.endswith("gamma"):
                value = torch.ones(shape, dtype=dtype)
            elif len(shape) < 2:
                value = torch.zeros(shape, dtype=dtype)
            else:
                value = rnd.values(shape, _numel(shape[1:]) ** -0.5)
            writer.write(name, value)
        total = writer.total_bytes
    return {"bytes": total, "tensors": len(layout)}


def write_template_files(models: Path, comfyui_dir, python: str, *, te_config: dict | None = None,
                         vision: bool = True, lm_head: bool = True, blocks: int = 2) -> dict[str, dict]:
    """The three files in `models/{diffusion_models,text_encoders,vae}` under the template's names."""
    layouts = comfy_layouts(comfyui_dir, python, te_config)
    return {
        TEXT_ENCODER: dict(write_text_encoder(models / "text_encoders" / TEXT_ENCODER, layouts["te"], vision=vision,
                                              lm_head=lm_head), path=models / "text_encoders" / TEXT_ENCODER),
        DIT: dict(write_dit(models / "diffusion_models" / DIT, blocks), path=models / "diffusion_models" / DIT),
        VAE: dict(write_vae(models / "vae" / VAE, layouts["vae"]), path=models / "vae" / VAE),
    }


SUPPORT_PACK = "dd-test-support"
SUPPORT_INIT = '''"""DiT Distillery's test support inside ComfyUI (written by the tests into a temporary base directory).

* CLIPLoader with type qwen_image builds ComfyUI's Qwen2.5-VL with the 7B's 28 layers and MLP width whatever the
  file holds. For a file with other counts (a small stand-in of qwen_2.5_vl_7b_fp8_scaled.safetensors) they are
  read from the file and given through ComfyUI's own `qwen25_7b_model_config` model option (what
  comfy.sd1_clip reads); a file with 28 layers of 18944 loads exactly as in stock ComfyUI.
* DDProbe_Save writes CONDITIONING, IMAGE, and a DD_PIPELINE's decode of a latents file to
  output/dd_probe/<name>.safetensors.
"""
import os

import comfy.sd
import folder_paths
from safetensors.torch import load_file, save_file

_stock = comfy.sd.load_text_encoder_state_dicts


def load_text_encoder_state_dicts(state_dicts=[], embedding_directory=None,
                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={}):
    if clip_type == comfy.sd.CLIPType.QWEN_IMAGE and len(state_dicts) == 1 and \\
            "qwen25_7b_model_config" not in model_options:
        sd = state_dicts[0]
        gate = sd.get("model.layers.0.mlp.gate_proj.weight")
        layers = len({k.split(".")[2] for k in sd if k.startswith("model.layers.")})
        if gate is not None and (layers, gate.shape[0]) != (28, 18944):
            model_options = dict(model_options, qwen25_7b_model_config={"num_hidden_layers": layers,
                                                                        "intermediate_size": int(gate.shape[0])})
    return _stock(state_dicts, embedding_directory, clip_type, model_options)


comfy.sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts


class DDProbeSave:
    CATEGORY = "_for_testing"
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "probe"})},
                "optional": {"conditioning": ("CONDITIONING",), "images": ("IMAGE",), "pipeline": ("DD_PIPELINE",),
                             "latents": ("STRING", {"default": ""})}}

    def save(self, name, conditioning=None, images=None, pipeline=None, latents=""):
        out = {}
        if conditioning is not None:
            cond, extra = conditioning[0]
            out["cond"] = cond
            if extra.get("attention_mask") is not None:
                out["mask"] = extra["attention_mask"]
        if images is not None:
            out["images"] = images
        if pipeline is not None and latents:
            out["decoded"] = pipeline.load().decode(load_file(latents)["latents"])
        folder = os.path.join(folder_paths.get_output_directory(), "dd_probe")
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in out.items()}, os.path.join(folder, name + ".safetensors"))
        return {}


NODE_CLASS_MAPPINGS = {"DDProbe_Save": DDProbeSave}
'''


def install_support_pack(custom_nodes: Path) -> Path:
    folder = Path(custom_nodes) / SUPPORT_PACK
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(SUPPORT_INIT)
    return folder


# ----------------------------------------------------------------------------------------------------------
# Running the bundled Qwen workflows small

def small(prompt: dict, tag: str, *, size: int = 64, prompts: str = "a red fox in the snow\na bowl of ramen",
          teacher_steps: int = 2, student_steps: int = 2, train_steps: int = 2, seeds_per_prompt: int = 1) -> dict:
    """A converted workflow (API format) made small: images `size`², few steps, 2 training steps, output names
    with `tag` (ComfyUI's cache and our runs keyed apart), no validation grids, one block kept by Shrink DiT."""
    prompt = json.loads(json.dumps(prompt))
    changes = {
        "DD_GenerateDistillDataset": dict(prompts=prompts, seeds_per_prompt=seeds_per_prompt, teacher_steps=teacher_steps,
                                          width=size, height=size, student_steps=student_steps, repeat=1,
                                          output_name=f"{{}}_{tag}"),
        "DD_TrainLoRAFull": dict(steps=train_steps, warmup_steps=0, save_every=0, validation_prompts="",
                                 output_name=f"{{}}_{tag}"),
        "DD_Sample": dict(width=size, height=size, steps=student_steps),
        "DD_ShrinkDiT": dict(target_blocks=1, calibration_prompts=prompts, calibration_size=max(64, size),
                             name=f"{{}}_{tag}"),
        "DD_DatasetFolder": dict(max_pixels=size * size, repeat=1),
        "SaveImage": dict(filename_prefix=f"{{}}_{tag}"),
    }
    for node in prompt.values():
        for key, value in changes.get(node["class_type"], {}).items():
            if key in node["inputs"]:
                old = node["inputs"][key]
                if isinstance(value, str) and "{}" in value:  # a name: tagged before its extension
                    stem, dot, ext = old.rpartition(".") if old.endswith(".safetensors") else (old, "", "")
                    value = value.format(stem) + dot + ext
                node["inputs"][key] = value
    return prompt
