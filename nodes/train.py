"""Training nodes: Train LoRA / Full, Export Training Job, Loss Chart.

Train runs the core trainer (`dit_distillery.trainer.train`) inside ComfyUI: it frees ComfyUI's models first, trains
a deep copy of the DiT with grad enabled inside ComfyUI's inference mode, reports progress on the node's bar and
through websocket events, and stops on Cancel after writing a resumable checkpoint. Its run lives in
`output/dit_distillery/<output_name>`; queueing it again with the same settings (`resume = auto`) continues from the
latest checkpoint, so a finished run is not retrained and a cancelled one picks up where it stopped. Raising
`steps` extends a run; changing anything else the checkpoint depends on asks for a new name or `resume = restart`.

Export Training Job takes the same inputs and writes the `TrainJob` JSON, an accelerate config beside it (DDP, or
FSDP2 with `distributed = fsdp`: full training sharded over the GPUs) and the `accelerate launch` command that run
the same training on a cluster.

Websocket events (for the JS extension; `sid` = the client that queued the prompt):
* `dit_distillery.train`: `{"node", "prompt_id", "phase": "data" | "train" | "checkpoint" | "done" | "stopped" | "error",
  "step", "total", "loss", "lr", "images_per_s", "eta_s", "epoch", "history": [[step, loss], ...] (at most 256
  points, evenly downsampled, the latest included), "message"}`. Sent at most every 0.25 s, and always for the
  first and last step and on every phase change.
* `dit_distillery.validation`: `{"node", "prompt_id", "step", "path", "image": {"filename", "subfolder", "type"},
  "url": "/view?filename=...&subfolder=...&type=output"}` for each validation grid the trainer writes.

Input names and their order are part of every saved workflow: never rename, remove or reorder them; add new inputs
at the end of "optional".
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from dit_distillery.errors import DistilleryError, StopRequested

from .common import (DATASET, LOSS, LOSS_HISTORY, NONE, PIPELINE, TRAIN_CATEGORY, TRAIN_EVENT, VALIDATION_EVENT,
                     Progress, downsample, find_model, format_seconds, free_comfy_memory, int_list, lines, list_models,
                     model_write_dir, output_dir, path_inside, pil_to_image, prompt_id, run_dir, safe_name,
                     send_event, send_text, text_image, user_errors, view_url)
from .refs import check_base_dtype, memory_inputs, swap_setting, training_pipeline


def _train_inputs() -> dict:
    """The inputs Train and Export Training Job share (names = the TrainJob settings they set)."""
    lr = {"min": 1e-8, "max": 1.0, "step": 1e-6, "round": False}
    return {
        "pipeline": (PIPELINE, {"tooltip": "The model to train (its DiT; a LoRA on it is merged first)."}),
        "dataset": (DATASET, {"tooltip": "The training data."}),
        "loss": (LOSS, {"tooltip": "Flow-Matching Loss (fine-tune, from scratch) or Direct Distill Loss."}),
        "mode": (["lora", "full"], {"default": "lora", "tooltip":
                 "lora: train low-rank adapters (small file, loads in stock LoRA loaders). full: train the DiT's "
                 "weights (a new DiT file; needs about 16 bytes of memory per parameter)."}),
        "output_name": ("STRING", {"default": "student", "tooltip":
                        "Run name: the run lives in output/dit_distillery/<name> (checkpoints, charts, validation) "
                        "and the result is also saved as models/loras/<name>.safetensors (lora) or "
                        "models/diffusion_models/<name>.safetensors (full)."}),
        "steps": ("INT", {"default": 1000, "min": 1, "max": 10_000_000, "tooltip":
                  "Optimiser steps in total (raise it and queue again to extend a finished run)."}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Samples per micro-batch."}),
        "grad_accum": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip":
                       "Micro-batches per optimiser step (effective batch = batch_size x grad_accum)."}),
        "learning_rate": ("FLOAT", {"default": 1e-4, **lr, "tooltip":
                          "Peak learning rate (LoRA ~1e-4, full ~1e-5)."}),
        "lr_schedule": (["constant", "cosine"], {"default": "constant", "tooltip":
                        "After warm-up: constant, or cosine decay to 0."}),
        "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip": "Linear warm-up steps."}),
        "optimizer": (["adamw", "adamw8bit", "adafactor"], {"default": "adamw", "tooltip":
                      "adamw8bit needs bitsandbytes (CUDA); adafactor saves optimiser memory for full training."}),
        "weight_decay": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                         "AdamW weight decay."}),
        "grad_clip": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip":
                      "Clip the gradient norm to this; 0 = off."}),
        "lora_rank": ("INT", {"default": 32, "min": 1, "max": 1024, "tooltip": "lora: adapter rank."}),
        "lora_alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 1.0, "tooltip":
                       "lora: alpha (scale = alpha / rank); 0 = rank (scale 1, DiffSynth's choice)."}),
        "lora_targets": ("STRING", {"default": "preset", "tooltip":
                         "lora: layers to adapt: 'preset' (the family's: DiffSynth's list for Qwen-Image), a preset "
                         "name (qwen_image_attn, qwen_image_all, aaadit_attn...) or module names 'to_q,to_k'."}),
        "init_lora": ([NONE] + list_models("loras"), {"tooltip":
                      "lora: continue training this LoRA file (models/loras) instead of new adapters."}),
        "full_trainable": ("STRING", {"default": "", "tooltip":
                           "full: comma-separated name prefixes of the trained weights (e.g. 'transformer_blocks.'); "
                           "empty = all."}),
        "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip":
                                   "Recompute each block in backward: far less activation memory, ~30% slower."}),
        "checkpoint_offload": ("BOOLEAN", {"default": False, "tooltip":
                               "Keep the saved activations in CPU memory instead of the GPU (DiffSynth's "
                               "--use_gradient_checkpointing_offload): less GPU memory, slower steps."}),
        "mixed_precision": (["auto", "no", "bf16", "fp16"], {"default": "auto", "tooltip":
                            "auto: bf16 autocast on a GPU, none on the CPU."}),
        "ema_decay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99999, "step": 0.0001, "round": False,
                                "tooltip": "Keep an exponential moving average of the weights (0 = off, e.g. 0.999)."}),
        "save_every": ("INT", {"default": 500, "min": 0, "max": 10_000_000, "tooltip":
                       "Steps between resumable checkpoints (also written at the end and on Cancel); 0 = end only."}),
        "keep_last": ("INT", {"default": 3, "min": 0, "max": 1000, "tooltip": "Checkpoints kept (0 = all)."}),
        "save_dtype": (["bf16", "fp16", "fp32"], {"default": "bf16", "tooltip": "dtype of the saved weights."}),
        "validation_prompts": ("STRING", {"multiline": True, "default": "", "tooltip":
                               "One prompt per line, sampled every validation_every steps and at the end (a grid "
                               "beside the teacher's images when distilling). Empty: no validation images."}),
        "validation_seeds": ("STRING", {"default": "0", "tooltip": "Seeds for each validation prompt, e.g. '0, 1'."}),
        "validation_every": ("INT", {"default": 0, "min": 0, "max": 10_000_000, "tooltip":
                             "Steps between validations; 0 = only at the end."}),
        "validation_steps": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                             "Sampling steps of the validation images; 0 = the student's (distillation) or the "
                             "pipeline's default."}),
        "validation_cfg": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1, "tooltip":
                           "CFG of the validation images; -1 = the student's (distillation) or the pipeline's default."}),
        "eval_samples": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip":
                         "Held-out loss on the first N samples with fixed noise, at the start, at each validation and "
                         "at the end (a steadier measure than the training loss); 0 = off."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 32 - 1, "control_after_generate": False,
                         "tooltip": "Seed of everything random in training (data order, noise, sigmas)."}),
        "resume": (["auto", "restart"], {"default": "auto", "tooltip":
                   "auto: continue the run's latest checkpoint (a finished run is not retrained). restart: move the "
                   "old run aside (output/dit_distillery/<name>.previous-N) and start over."}),
    }


TRAIN_INPUT_NAMES = tuple(_train_inputs())


def _teacher_input() -> dict:
    """The optional teacher (the job's `model.teacher`), after the other optional inputs."""
    return {"teacher": (PIPELINE, {"tooltip":
                        "The teacher, when it is not the trained pipeline's own DiT: DMD's real score (needed when "
                        "the student is another DiT, e.g. from Shrink DiT) and the validation grid's teacher column. "
                        "Its DiT file is used (one file, no LoRA on top); the text encoder and VAE stay the "
                        "pipeline's."})}


def teacher_dit_path(teacher) -> str:
    """The DiT file or transformer folder of a teacher pipeline, as the job's `model.teacher` names it."""
    if getattr(teacher, "not_exportable", None):
        raise DistilleryError("teacher", teacher.describe(), "its DiT is ComfyUI's loaded model, which a training "
                              "job cannot name as a file.", "load the teacher with Load Pipeline (its DiT file).")
    if teacher.loras:
        raise DistilleryError("teacher", teacher.describe(), "has LoRAs on top; the teacher is one DiT file.",
                              "merge them into a DiT file first (Load Student with export_name) and connect that "
                              "pipeline.")
    if teacher.dit:
        return str(teacher.dit)
    folder = Path(str(teacher.source or ""))
    if (folder / "model_index.json").is_file() and (folder / "transformer").is_dir():
        return str(folder / "transformer")
    raise DistilleryError("teacher", teacher.describe(), "has no DiT file (a built-in pipeline).",
                          "save its DiT first (Load Student with export_name) and connect that pipeline.")
TRAINING_USE = "training (fp8: LoRA only; also fp8 when the pipeline's base_dtype is)"


def build_job(pipeline, dataset, loss, out_dir: str, **w):
    """The `TrainJob` these inputs describe (checked by `TrainJob.validate`)."""
    from dit_distillery.trainer import TrainJob

    model, lora_preset = pipeline.job_model()
    if w.get("teacher") is not None:
        model["teacher"] = teacher_dit_path(w["teacher"])
    init = None if w["init_lora"] in (None, "", NONE) else str(find_model("loras", w["init_lora"], "init_lora"))
    prefixes = [p.strip() for p in str(w["full_trainable"]).split(",") if p.strip()] or [""]
    spec = {
        "model": model,
        "data": dataset.data_spec(),
        "loss": dict(loss),
        "mode": w["mode"],
        "lora": {"rank": int(w["lora_rank"]), "alpha": float(w["lora_alpha"]) or None,
                 "targets": str(w["lora_targets"]).strip() or "preset", "init_from": init, **lora_preset},
        "full_trainable": prefixes,
        "optim": {"name": w["optimizer"], "lr": float(w["learning_rate"]), "weight_decay": float(w["weight_decay"]),
                  "schedule": w["lr_schedule"], "warmup_steps": int(w["warmup_steps"]),
                  "grad_clip": float(w["grad_clip"]) or None},
        "steps": int(w["steps"]),
        "batch_size": int(w["batch_size"]),
        "grad_accum": int(w["grad_accum"]),
        "mixed_precision": w["mixed_precision"],
        "gradient_checkpointing": bool(w["gradient_checkpointing"]),
        # an fp8 pipeline (Load Pipeline's base_dtype) is an fp8 base: the job says so, for Export Training Job too
        "base_dtype": "fp8" if getattr(pipeline, "base_dtype", "bf16") == "fp8" else
                      check_base_dtype(w.get("base_dtype", "bf16")),
        "blocks_to_swap": swap_setting(w.get("blocks_to_swap", 0)),
        "checkpoint_offload": bool(w["checkpoint_offload"]),
        "ema_decay": float(w["ema_decay"]),
        "seed": int(w["seed"]),
        "output": {"dir": str(out_dir), "name": safe_name(w["output_name"], "output_name"),
                   "save_every": int(w["save_every"]), "keep_last": int(w["keep_last"]),
                   "save_dtype": w["save_dtype"]},
        "validation": {"prompts": lines(w["validation_prompts"]),
                       "seeds": int_list(w["validation_seeds"], "validation_seeds") or [0],
                       "every": int(w["validation_every"]), "steps": int(w["validation_steps"]) or None,
                       "cfg": None if w["validation_cfg"] < 0 else float(w["validation_cfg"]),
                       "eval_samples": int(w["eval_samples"])},
        "resume": "auto" if w["resume"] == "auto" else None,
    }
    return TrainJob.from_dict(spec)


class NodeCallbacks:
    """The trainer's callbacks -> the node's progress bar, its text, and the websocket events (module docstring)."""

    def __init__(self, progress: Progress, node_id: str | None, total: int, out: Path, min_interval: float = 0.25):
        self.progress, self.node_id, self.total = progress, node_id, total
        self.min_interval = min_interval
        self.run = _output_relative(out)  # where the run's files are, for /view URLs (metrics.jsonl, loss.png)
        self.history: list[list] = []  # [step, loss]: on_history (a resumed run's earlier steps), then on_step
        self._last_sent = 0.0
        self.last: dict = {}

    def send(self, phase: str, force: bool = False, **data) -> bool:
        """Send a `dit_distillery.train` event (throttled unless forced); True when it went out."""
        now = time.monotonic()
        if not force and now - self._last_sent < self.min_interval:
            return False
        self._last_sent = now
        payload = {"node": self.node_id, "prompt_id": prompt_id(), "step": None, "total": self.total, "loss": None,
                   "lr": None, "images_per_s": None, "eta_s": None, "epoch": None, "message": None, "run": self.run}
        payload.update(self.last)
        payload.update(phase=phase, history=downsample(self.history), **data)
        send_event(TRAIN_EVENT, payload)
        return True

    def on_message(self, text: str) -> None:
        send_text(self.node_id, text)
        self.send("train" if self.last else "data", force=True, message=text)

    def on_data_progress(self, done: int, total: int) -> None:
        self.progress(done, total)
        self.send("data", force=done == total, message=f"encoding data {done}/{total}")

    def on_history(self, history: list[dict]) -> None:
        self.history = [[h["step"], h["loss"]] for h in history]

    def on_step(self, info) -> None:
        self.history.append([info.step, info.loss])
        first = not self.last
        self.last = {"step": info.step, "total": info.total, "loss": info.loss, "lr": info.lr,
                     "images_per_s": info.images_per_s, "eta_s": info.eta_s, "epoch": info.epoch}
        self.progress(info.step, info.total)
        if self.send("train", force=first or info.step == info.total):
            send_text(self.node_id, f"step {info.step}/{info.total} · loss {info.loss:.4f} · lr {info.lr:.2e} · "
                                    f"{info.images_per_s:.1f} img/s · ETA {format_seconds(info.eta_s)}")

    def on_validation(self, step: int, grid, path) -> None:
        ref = view_url(Path(path))
        send_event(VALIDATION_EVENT, {"node": self.node_id, "prompt_id": prompt_id(), "step": step, "path": str(path),
                                      "image": None if ref is None else {k: ref[k] for k in ("filename", "subfolder",
                                                                                               "type")},
                                      "url": None if ref is None else ref["url"]})

    def on_checkpoint(self, step: int, path, weights) -> None:
        self.send("checkpoint", force=True, message=f"checkpoint at step {step}: {path}")


def _output_relative(out: Path) -> dict | None:
    """{"subfolder", "type": "output"} of a run folder inside ComfyUI's output folder, for /view URLs."""
    try:
        return {"subfolder": out.resolve().relative_to(output_dir().resolve()).as_posix(), "type": "output"}
    except ValueError:
        return None


def _archive(out: Path) -> Path | None:
    """Move an earlier run aside (never deleted): output/dit_distillery/<name>.previous-N."""
    if not out.exists():
        return None
    from dit_distillery.runlock import ensure_free

    ensure_free(out, "output_name")  # a run still working in it (another ComfyUI, the CLI) keeps its folder
    n = 1
    while out.with_name(f"{out.name}.previous-{n}").exists():
        n += 1
    target = out.with_name(f"{out.name}.previous-{n}")
    os.replace(out, target)
    return target


def _lend_dit(base, job):
    """Lend the loaded pipeline's DiT to a training copy that shares its weights. When the copy is stored in fp8
    or block-swapped (the job's base_dtype / blocks_to_swap), or the DiT itself is swapped (Load Pipeline's
    blocks_to_swap), the trainer places the copy itself: the DiT waits on the CPU, its swap lifted (a swap's hooks
    and host buffers are its own), so that only the copy takes GPU memory. Returns `restore(work)`: afterwards the
    copy's swap is lifted (it holds the shared weights' masters) and the DiT is placed as it was, swapped on the
    same blocks again."""
    from dit_distillery.block_swap import block_swap_of, disable_block_swap, enable_block_swap

    swap = block_swap_of(base.dit)
    if swap is None and job.base_dtype != "fp8" and job.blocks_to_swap == 0:
        return lambda work: None
    n, device = (swap.count, swap.device) if swap is not None else (0, base.device)
    disable_block_swap(base.dit, "cpu")
    base.dit.to("cpu")

    def restore(work) -> None:
        if work is not None:
            disable_block_swap(work.dit, "cpu")
        if n:
            enable_block_swap(base.dit, n, device)
        else:
            base.dit.to(device)

    return restore


def _publish_target(mode: str, name: str) -> Path:
    """Where the trained file is copied so stock loaders list it (models/loras or models/diffusion_models),
    checked before training: a file of that name that this pack did not train is never replaced."""
    from dit_distillery.formats import TensorSource

    kind = "loras" if mode == "lora" else "diffusion_models"
    target = path_inside(model_write_dir(kind), name, "output_name", ".safetensors")
    if target.exists():
        with TensorSource(target, "output_name", prefixes=()) as src:
            ours = "dit_distillery.training" in src.metadata
        if not ours:
            raise DistilleryError("output_name", name, f"{target} exists and was not trained by this pack.",
                                  "choose another output_name.")
    return target


def _publish(weights: Path, target: Path) -> Path:
    from dit_distillery.formats import atomic_output

    if target.exists() and target.stat().st_size == weights.stat().st_size \
            and target.read_bytes() == weights.read_bytes():
        return target
    with atomic_output(target) as tmp:
        shutil.copyfile(weights, tmp)
    return target


class TrainLoRAFull:
    DESCRIPTION = ("Trains a LoRA or the full DiT of a pipeline on a dataset with a loss (flow-matching SFT or Direct "
                   "Distill), with warm-up/cosine LR, clipping, EMA, checkpoints, validation images and a held-out "
                   "loss. Shows progress, stops on Cancel after saving a resumable checkpoint, and continues that "
                   "checkpoint when queued again (resume = auto). Frees ComfyUI's loaded models first.")
    CATEGORY = TRAIN_CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = (PIPELINE, "STRING", LOSS_HISTORY, "IMAGE")
    RETURN_NAMES = ("model", "weights", "loss_history", "validation")
    OUTPUT_TOOLTIPS = ("The trained model (the pipeline with the LoRA on top, or with the new DiT) for Sample, Load "
                       "Student or more training.",
                       "The saved LoRA (models/loras) or DiT (models/diffusion_models) file.",
                       "Loss per step (and held-out loss), for Loss Chart.",
                       "The last validation grid (or a note when there are no validation prompts).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _train_inputs(), "optional": {**memory_inputs(TRAINING_USE), **_teacher_input()},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def train(self, pipeline, dataset, loss, unique_id=None, **widgets):
        from PIL import Image

        from dit_distillery.trainer import train

        out = run_dir(widgets["output_name"])
        job = build_job(pipeline, dataset, loss, str(out), **widgets)  # every check before anything is written
        target = _publish_target(job.mode, job.output.name)
        if widgets["resume"] == "restart":
            _archive(out)
        free_comfy_memory()
        progress = Progress(job.steps, unique_id)
        callbacks = NodeCallbacks(progress, unique_id, job.steps, out)
        with user_errors(progress):
            base = pipeline.without_loras().load()
        # the trainer seeds its own (forked) RNG from job.seed, so a queued-again graph gives the same weights
        with user_errors(progress), torch.inference_mode(False), torch.enable_grad():
            restore = _lend_dit(base, job)
            work = None
            try:
                # plain LoRA training only adds adapters: the frozen weights are shared, not copied
                work = training_pipeline(base, share_weights=job.mode == "lora" and not job.lora.preset)
                result = train(job, pipeline=work, callbacks=callbacks, stop=progress.stop)
            except StopRequested:
                callbacks.send("stopped", force=True, message="stopped; queue again to continue from the checkpoint")
                raise
            except Exception as exc:
                callbacks.send("error", force=True, message=str(exc))
                raise
            finally:
                restore(work)
        callbacks.send("done", force=True, message=f"done: {result.weights}")
        weights = _publish(Path(result.weights), target)
        model = pipeline.with_lora(str(weights)) if job.mode == "lora" else pipeline.with_dit(str(weights))
        history = {"title": f"{job.output.name}: {job.loss['kind']} loss", "history": list(result.history),
                   "eval": list(result.eval_history)}
        if result.validation:
            with Image.open(result.validation[-1]) as im:
                validation = pil_to_image([im])
        else:
            validation = text_image("no validation prompts:\nadd some to see samples")
        return (model, str(weights), history, validation)


class ExportTrainingJob:
    DESCRIPTION = ("Writes the training described by the same inputs as Train LoRA / Full as a job JSON, an "
                   "accelerate config beside it (DDP, or FSDP for sharded full training) and the `accelerate launch` "
                   "command that runs it on a cluster (one process per GPU). Nothing is trained "
                   "here. Paths of models and data are this machine's: they must exist at the same place on the "
                   "cluster (or edit the JSON).")
    CATEGORY = TRAIN_CATEGORY
    FUNCTION = "export"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("job_path", "command")
    OUTPUT_TOOLTIPS = ("The job JSON (output/dit_distillery/jobs/<output_name>.json).",
                       "The shell command that runs it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **_train_inputs(),
            "num_processes": ("INT", {"default": 1, "min": 1, "max": 1024, "tooltip":
                              "Processes (GPUs) for accelerate launch; the batch is per process."}),
            "cluster_output_dir": ("STRING", {"default": "", "tooltip":
                                   "Where the cluster run writes; empty = out/<output_name> relative to where the "
                                   "command is run."}),
        }, "optional": {
            "distributed": (["ddp", "fsdp"], {"default": "ddp", "tooltip":
                            "ddp: every GPU holds the whole model (LoRA, or full training that fits one GPU). fsdp: "
                            "full training sharded over the GPUs (weights, gradients and AdamW states split: "
                            "accelerate's FSDP2), for a DiT whose full training does not fit one GPU."}),
            **memory_inputs(TRAINING_USE),
            **_teacher_input(),
        }}

    def export(self, pipeline, dataset, loss, num_processes, cluster_output_dir, distributed="ddp", **widgets):
        name = safe_name(widgets["output_name"], "output_name")
        if getattr(pipeline, "not_exportable", None):  # e.g. Pipeline from ComfyUI Models
            raise DistilleryError("pipeline", pipeline.describe(), pipeline.not_exportable,
                                  "train it here with Train LoRA / Full, or export a pipeline made by Load Pipeline "
                                  "from the same model files.")
        out = str(cluster_output_dir).strip() or f"out/{name}"
        job = build_job(pipeline, dataset, loss, out, **widgets)
        job.distributed = distributed
        job.validate()  # (fsdp: full training only, ...)
        if job.data.synthetic is not None:
            job.data.path = None  # the cluster writes its own copy of the synthetic shapes
        folder = output_dir() / "dit_distillery" / "jobs"
        path = path_inside(folder, name, "output_name", ".json")
        job.save(path)
        from dit_distillery.formats import atomic_write_text
        from dit_distillery.trainer.launch import write_launch

        config, command = write_launch(job, path, int(num_processes))  # <name>.accelerate.yaml beside the job
        atomic_write_text(path.with_suffix(".sh"), f"#!/bin/sh\n# DiT Distillery training job {name}\n{command}\n")
        text = f"job: {path}\naccelerate config: {config}\ncommand: {command}"
        return {"ui": {"text": [text]}, "result": (str(path), command)}


class LossChart:
    DESCRIPTION = ("Draws a loss history as an image: the raw losses faint, a moving average on top, the learning "
                   "rate on the right axis and the held-out loss as dots.")
    CATEGORY = TRAIN_CATEGORY
    FUNCTION = "chart"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("chart",)
    OUTPUT_TOOLTIPS = ("The chart (connect to Preview Image or Save Image).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "loss_history": (LOSS_HISTORY, {"tooltip": "From Train LoRA / Full."}),
            "smoothing": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 0.999, "step": 0.01,
                                    "tooltip": "Moving-average weight (0 = none)."}),
            "log_scale": ("BOOLEAN", {"default": False, "tooltip": "Logarithmic loss axis."}),
            "width": ("INT", {"default": 640, "min": 200, "max": 4096, "step": 8, "tooltip": "Image width."}),
            "height": ("INT", {"default": 360, "min": 120, "max": 4096, "step": 8, "tooltip": "Image height."}),
        }}

    def chart(self, loss_history, smoothing, log_scale, width, height):
        from dit_distillery.charts import loss_chart
        from dit_distillery.trainer.validation import aux_series

        history = loss_history.get("history", [])
        image = loss_chart([h["step"] for h in history], [h["loss"] for h in history],
                           lrs=[h["lr"] for h in history] if history and "lr" in history[0] else None,
                           title=loss_history.get("title", "loss"), width=width, height=height,
                           smoothing=smoothing, log_scale=log_scale,
                           evals=[(e["step"], e["eval_loss"]) for e in loss_history.get("eval", [])],
                           **aux_series(history))  # (DMD's fake-score loss)
        return (pil_to_image([image]),)


NODE_CLASS_MAPPINGS = {
    "DD_TrainLoRAFull": TrainLoRAFull,
    "DD_ExportTrainingJob": ExportTrainingJob,
    "DD_LossChart": LossChart,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DD_TrainLoRAFull": "Train LoRA / Full",
    "DD_ExportTrainingJob": "Export Training Job",
    "DD_LossChart": "Loss Chart",
}
