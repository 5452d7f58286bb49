"""Our training step without the trainer's start-up: the step function `trainer.loop.Trainer.run` executes.

For the Qwen-Image micro-benchmarks (one 20B model, a handful of steps) the trainer's data preparation and cache
build would dominate, so this runs the trainer's own pieces (`trainer.setup`) on batches already on the device:
`set_trainable` (peft LoRA, fp32 adapters, or fp32 full masters), `enable_gradient_checkpointing`,
`make_optimizer`, the warm-up/cosine `LambdaLR`, `TrainingModule` (DiT + loss; for Direct Distill the whole unrolled
student sampler), `accelerator.prepare`, then per step exactly the loop's body: autocast forward, backward,
gradient clipping, optimiser and LR step, `zero_grad(set_to_none=True)`, and the loss reduced to a float (the
loop's NaN check, which also synchronises).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from bench.common import StepClock


def run_steps(dit: torch.nn.Module, job, make_batch: Callable[[int], dict], device, *, warmup: int, steps: int) -> dict:
    from dit_distillery.losses import SampleRNG, loss_from_dict
    from dit_distillery.trainer.setup import (TrainingModule, make_accelerator, make_lr_scheduler, make_optimizer,
                                              set_trainable)

    job.validate()
    acc = make_accelerator(job)
    loss_fn = loss_from_dict(job.loss)
    dit.train()
    names = set_trainable(job, dit)
    if job.gradient_checkpointing and hasattr(dit, "enable_gradient_checkpointing"):
        dit.enable_gradient_checkpointing()
    dit.to(device)
    trainable = sorted((n, p) for n, p in dit.named_parameters() if p.requires_grad)
    params = [p for _, p in trainable]
    optimizer = make_optimizer(job, params)
    scheduler = make_lr_scheduler(job, optimizer)
    module, optimizer = acc.prepare(TrainingModule(dit, loss_fn, None, 0.0, job.checkpoint_offload), optimizer)
    clock = StepClock(device, warmup)
    losses = []
    clock.start()
    for step in range(warmup + steps):
        batch = make_batch(step)
        rng = SampleRNG(job.seed, step, [f"0:{r}" for r in batch["row"]])
        with acc.autocast():
            loss, _ = module(batch, rng)
        acc.backward(loss)
        if job.optim.grad_clip:
            acc.clip_grad_norm_(params, job.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(acc.reduce(loss.detach(), reduction="mean")))
        clock.tick()
    out = clock.summary(images_per_step=len(batch["row"]))
    out.update(losses_finite=all(math.isfinite(x) for x in losses), losses=losses,
               trainable_parameters=sum(p.numel() for p in params), trainable_modules=len(names),
               path="trainer.loop step function (TrainingModule + the loop's optimiser step), see bench/ours_step.py")
    return out


def qwen_batch(latents: torch.Tensor, embeds: torch.Tensor, *, distill: bool, student_steps: int = 4) -> dict:
    """A collated batch as `data.collate` makes it, for a Qwen-Image DiT (cached latents + prompt embeddings)."""
    from dit_distillery.conditioning import TextEmbeds

    b = latents.shape[0]
    return {"latents": latents, "target_latents": latents if distill else None, "text": TextEmbeds(embeds, None),
            "prompt": ["bench"] * b, "seed": list(range(b)) if distill else [None] * b, "rand_device": ["cpu"] * b,
            "num_inference_steps": [student_steps if distill else None] * b, "cfg_scale": [1.0 if distill else None] * b,
            "teacher_steps": [None] * b, "teacher_cfg": [None] * b, "size": [tuple(latents.shape[-2:])] * b,
            "row": list(range(b)), "where": [f"bench row {i}" for i in range(b)]}
