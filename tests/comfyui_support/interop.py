"""Do our files load in stock ComfyUI? Helpers that make test files and read back what ComfyUI made of them.

`comfy_load(server, dit_file, lora_file)` runs stock nodes only: UNETLoader -> LoraLoaderModelOnly ->
ModelSave. ModelSave writes the model exactly as ComfyUI holds it, LoRA patches applied
(`comfy.sd.save_checkpoint` loads with `force_patch_weights=True`), so the weights it wrote are the weights
ComfyUI would sample with. Nothing needs a text encoder or a custom node.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .server import ComfyUIServer

LORA_NOT_LOADED = "lora key not loaded"


def random_qwen_image(num_layers: int = 1, seed: int = 0, std: float = 0.02, dtype=torch.bfloat16):
    """Qwen-Image's DiT at its real width (24 heads x 128, text 3584) with `num_layers` blocks and random weights.

    Parameters are created empty (accelerate) and filled with N(0, std) directly in `dtype`: a 1-block model
    has 0.36 B parameters, and a normal init in fp32 would cost twice the memory and most of the time.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    from dit_distillery.models.qwen_image import QWEN_IMAGE_CONFIG, model_class

    with init_empty_weights():
        model = model_class()(**dict(QWEN_IMAGE_CONFIG, num_layers=num_layers))
    generator = torch.Generator().manual_seed(seed)
    for name, param in list(model.named_parameters()):
        value = torch.randn(param.shape, generator=generator, dtype=dtype).mul_(std)
        set_module_tensor_to_device(model, name, "cpu", value=value, dtype=dtype)
    return model.eval()


def peft_lora_state(model, target_modules: list[str], rank: int = 4, alpha: float = 8.0, seed: int = 1,
                    std: float = 0.05) -> dict[str, torch.Tensor]:
    """A LoRA state dict with peft's own key names (`<module>.lora_A.weight` / `.lora_B.weight`), random A and B
    (peft initialises B to zero) in bf16, plus the `<module>.alpha` scalars ComfyUI needs to use lora_alpha.

    The adapter is added through diffusers' `add_adapter` and removed with `unload_lora`: `model` is unchanged.
    """
    from peft import LoraConfig, get_peft_model_state_dict

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules))
    try:
        shapes = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    finally:
        model.unload_lora()
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=generator).mul_(std).to(torch.bfloat16) for k, shape in sorted(shapes.items())}
    for key in list(state):
        if key.endswith(".lora_A.weight"):
            state[key[: -len(".lora_A.weight")] + ".alpha"] = torch.tensor(float(alpha))
    return state


def expected_lora_weight(base: torch.Tensor, lora: dict[str, torch.Tensor], module: str,
                         strength: float = 1.0) -> torch.Tensor:
    """W + strength * alpha / rank * B @ A, in float32 (what peft merges and ComfyUI patches)."""
    a = lora[f"{module}.lora_A.weight"].float()
    b = lora[f"{module}.lora_B.weight"].float()
    alpha = float(lora[f"{module}.alpha"]) if f"{module}.alpha" in lora else a.shape[0]
    return base.float() + strength * alpha / a.shape[0] * (b @ a)


@dataclass
class ComfyLoad:
    log: str  # the server log written while the graph ran
    weights: dict[str, torch.Tensor]  # module name -> weight ComfyUI holds (LoRA applied)
    keys: list[str] = field(default_factory=list)  # every tensor ComfyUI saved, prefix stripped
    prefix: str = ""  # the prefix ComfyUI saved the diffusion model under

    @property
    def lora_keys_not_loaded(self) -> list[str]:
        return [line.split(LORA_NOT_LOADED + ":", 1)[1].strip() for line in self.log.splitlines()
                if LORA_NOT_LOADED in line]


def comfy_load(server: ComfyUIServer, dit_file: str | os.PathLike, lora_file: str | os.PathLike | None = None,
               modules: list[str] = (), strength: float = 1.0, timeout: float = 600) -> ComfyLoad:
    """Load `dit_file` with UNETLoader (and `lora_file` with LoraLoaderModelOnly) in a running server; return the
    log and the weights of `modules` as ComfyUI holds them. Weights are `<module>.weight` (or `<module>` when a
    full tensor name is given)."""
    tag = uuid.uuid4().hex[:10]
    links = [_link(server.base_dir / "models" / "diffusion_models", dit_file, tag)]
    prompt = {"1": {"class_type": "UNETLoader",
                    "inputs": {"unet_name": links[0].name, "weight_dtype": "default"}}}
    model = ["1", 0]
    if lora_file is not None:
        links.append(_link(server.base_dir / "models" / "loras", lora_file, tag))
        prompt["2"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": model, "lora_name": links[1].name, "strength_model": strength}}
        model = ["2", 0]
    prompt["3"] = {"class_type": "ModelSave", "inputs": {"model": model, "filename_prefix": f"dd_check/{tag}"}}
    mark = server.log_mark()
    try:
        server.run_prompt(prompt, timeout)
        saved = sorted((server.base_dir / "output" / "dd_check").glob(f"{tag}_*.safetensors"))
        if len(saved) != 1:
            raise RuntimeError(f"ModelSave wrote {saved}, expected one file")
        try:
            with safe_open(saved[0], "pt") as f:
                keys = list(f.keys())
                prefix = _common_prefix(keys)
                weights = {}
                for module in modules:
                    name = module if prefix + module in keys else f"{module}.weight"
                    weights[module] = f.get_tensor(prefix + name)
        finally:
            saved[0].unlink()
    finally:
        for link in links:
            link.unlink(missing_ok=True)
        server.free()
    return ComfyLoad(server.log(mark), weights, [k[len(prefix):] for k in keys], prefix)


def _link(folder: Path, target: str | os.PathLike, tag: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / f"{tag}_{Path(target).name}"
    link.symlink_to(Path(target).resolve())
    return link


def _common_prefix(keys: list[str]) -> str:
    """ComfyUI saves a diffusion model under `model.diffusion_model.`; find it rather than assume it."""
    for key in keys:
        if key.endswith("img_in.weight"):
            return key[: -len("img_in.weight")]
    return ""
