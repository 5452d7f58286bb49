"""ComfyUI's side: its native Train LoRA node (`comfy_extras/nodes_train.py` `TrainLoraNode`), called directly in
ComfyUI's own Python (`COMFYUI_PYTHON`, run from the `COMFYUI_DIR` checkout), always in a child process.

The model is a Qwen-Image DiT as ComfyUI itself builds it from a state dict
(`comfy.sd.load_diffusion_model_state_dict`, what UNETLoader does): the keys and shapes of diffusers'
`QwenImageTransformer2DModel` at full width, which ComfyUI reads unconverted. Only weight values are ours: the
state dict is allocated empty, and once ComfyUI has loaded the model onto the device its parameters are filled
with N(0, 0.02) in place (no 40 GB random file is written). The data are cached latents `[N, 16, 1, h, w]` (the
5-D layout ComfyUI's Qwen model takes) and one positive conditioning of cached prompt embeddings.

Timing wraps `TrainSampler`'s per-step `loss_callback` (called after each backward, `loss.item()` synchronises):
step i's time runs from callback i-1 to callback i. ComfyUI adapts every weight of the model (its adapters have no
target choice, plus full bias and norm deltas); that difference is the node's, and is recorded.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import PeakMemory, StepClock, setup_torch

ENV_DIR, ENV_PYTHON = "COMFYUI_DIR", "COMFYUI_PYTHON"


def locate() -> tuple[Path | None, str]:
    value = os.environ.get(ENV_DIR)
    return (Path(value) if value else None), os.environ.get(ENV_PYTHON, sys.executable)


def train_lora(settings: dict) -> dict:
    root, _ = locate()
    if root is None:
        return {"skipped": f"no {ENV_DIR}"}
    device = setup_torch(settings)
    sys.path.insert(0, str(root))
    os.chdir(root)
    from comfy.cli_args import args

    if device.type == "cpu":
        args.cpu = True  # before comfy.model_management is imported (comfyui-facts A1)
    args.base_directory = tempfile.mkdtemp(prefix="comfy_bench.")  # nothing is written into the checkout
    import comfy.model_management as mm
    import comfy.sd
    import comfy_extras.nodes_train as nodes_train
    from accelerate import init_empty_weights

    from bench import workloads
    from dit_distillery.models.qwen_image import model_class

    with init_empty_weights():
        shapes = {k: v.shape for k, v in model_class()(**workloads.qwen_dit_config(settings["num_layers"])).state_dict().items()}
    state = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.bfloat16})
    del state
    mm.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
    g = torch.Generator(device=mm.get_torch_device()).manual_seed(0)
    with torch.no_grad():
        for p in patcher.model.diffusion_model.parameters():
            p.normal_(0.0, 0.02, generator=g) if p.device == g.device else p.normal_(0.0, 0.02)

    h = w = settings["image_size"] // 8
    latents = {"samples": workloads.qwen_latents(settings["dataset_size"], settings["image_size"], settings["image_size"],
                                                 "cpu").unsqueeze(2)}
    positive = [[workloads.qwen_text_embeds(1, settings["text_tokens"], "cpu", torch.float32), {}]]
    total = settings["warmup"] + settings["steps"]
    clock = StepClock(device, settings["warmup"], PeakMemory(device))
    original_init = nodes_train.TrainSampler.__init__

    def timed_init(self, *a, **kw):
        original_init(self, *a, **kw)
        callback = self.loss_callback

        def tick(loss):
            clock.tick()
            if callback:
                callback(loss)

        self.loss_callback = tick
        clock.start()

    nodes_train.TrainSampler.__init__ = timed_init
    try:
        _, lora, losses, _ = nodes_train.TrainLoraNode().train(
            patcher, latents, positive, batch_size=1, steps=total, grad_accumulation_steps=1,
            learning_rate=1e-4, rank=settings["rank"], optimizer="AdamW", loss_function="MSE", seed=0,
            training_dtype=settings["training_dtype"], lora_dtype=settings["lora_dtype"], algorithm="LoRA",
            gradient_checkpointing=settings["gradient_checkpointing"], existing_lora="[None]")
    finally:
        nodes_train.TrainSampler.__init__ = original_init
    out = clock.summary(images_per_step=1)
    import comfyui_version

    out.update(comfyui_version=getattr(comfyui_version, "__version__", None), batch=1,
               trainable_parameters=sum(t.numel() for t in lora.values()), trainable_tensors=len(lora),
               losses=[float(x) for x in losses["loss"]], latent_shape=[1, 16, 1, h, w],
               dtype=f"bf16 base, training_dtype {settings['training_dtype']}, lora_dtype {settings['lora_dtype']}",
               targets="every weight of the model (TrainLoraNode has no target choice) + bias/norm deltas",
               path="comfy_extras.nodes_train.TrainLoraNode.train, called directly")
    return out
