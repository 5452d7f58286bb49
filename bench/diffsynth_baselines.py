"""DiffSynth-Studio's side of each benchmark: its own training and sampling code, run from a checkout.

`DIFFSYNTH_DIR` names a DiffSynth-Studio checkout (never committed here). It is imported through `sys.path` in the
side's own process. What runs is DiffSynth's code: `launch_training_task` (AdamW, ConstantLR, a batch-1
DataLoader, accelerate), the training modules (`AAATrainingModule` of the train-from-scratch tutorial,
`QwenImageTrainingModule` of examples/qwen_image/model_training/train.py), their pipeline units, `FlowMatchSFTLoss`,
`DirectDistillLoss`, `FlowMatchScheduler`, `QwenImageDiT`, `Flux2VAE`, and `QwenImagePipeline.__call__`.

What is replaced, and only that:
* weight downloads: `from_pretrained` is swapped for a function returning a pipeline whose models are built
  locally with random weights (the same weights our side builds, see `workloads`), and the tutorial's hard-coded
  `AAADiT()` gets the tiny width on the tiny run;
* `ModelLogger`: a stand-in whose `on_step_end` times each step and stops the loop after the measured steps;
* optional imports that fail here: DiffSynth imports torchvision/imageio/modelscope at module level for image
  resizing, video IO and downloads. When one is not installed, a placeholder module is put in `sys.modules`
  while DiffSynth imports and removed afterwards (any call into it raises); the result records which. If
  torchvision is a placeholder, the AAADiT loop reads its already-256² images with PIL instead of
  `UnifiedDataset`'s crop-and-resize (a no-op at that size).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

from bench.common import Finished, PeakMemory, StepClock, free, setup_torch

ENV = "DIFFSYNTH_DIR"
OPTIONAL_IMPORTS = ("torchvision", "imageio", "imageio.v3", "modelscope")
# DiffSynth's LoRA targets for Qwen-Image (examples/qwen_image/model_training/lora/*.sh)
QWEN_LORA_TARGETS = "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1"


def locate() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def skipped() -> dict:
    return {"skipped": f"no {ENV}"}


class _Placeholder(types.ModuleType):
    """A module that is not installed: importing names from it works, calling them raises."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name}: {self.__name__} is not installed in this environment")

        return unavailable


def import_diffsynth(root: Path) -> dict:
    """Import `diffsynth` from `root` (see the module docstring); returns notes for the result file."""
    if not (root / "diffsynth" / "__init__.py").is_file():
        raise FileNotFoundError(f"{ENV}={root} is not a DiffSynth-Studio checkout (no diffsynth/__init__.py)")
    sys.path.insert(0, str(root))
    # Libraries that probe for torchvision must do it before any placeholder exists.
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers
    import transformers.integrations  # noqa: F401

    placed: list[str] = []
    try:
        for _ in range(len(OPTIONAL_IMPORTS) + 1):
            try:
                import diffsynth.diffusion  # noqa: F401
                import diffsynth.pipelines.qwen_image  # noqa: F401
                break
            except ModuleNotFoundError as exc:
                if exc.name not in OPTIONAL_IMPORTS or exc.name in placed:
                    raise
                parts = exc.name.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    if name not in sys.modules:
                        module = _Placeholder(name)
                        module.__path__ = []
                        sys.modules[name] = module
                placed.append(exc.name)
                for name in [n for n in sys.modules if n == "diffsynth" or n.startswith("diffsynth.")]:
                    del sys.modules[name]
    finally:
        for name in [n for n, m in sys.modules.items() if isinstance(m, _Placeholder)]:
            del sys.modules[name]
    from diffsynth.core.attention import attention

    commit = diffsynth_commit(root)
    return {"dir": str(root), "commit": commit, "placeholder_imports": placed,
            "attention_implementation": getattr(attention, "ATTENTION_IMPLEMENTATION", None),
            "transformers_sees_torchvision": bool(transformers.utils.import_utils.is_torchvision_available())}


def diffsynth_commit(root: Path) -> str | None:
    """The checkout's commit; for an unpacked `git archive` (bench/gpu_wheels.sh), the `.git_commit` file beside it.
    Never the commit of a repository that merely contains the folder (ours, when it is vendored inside it)."""
    marker = root / ".git_commit"
    if marker.is_file():
        return marker.read_text().strip() or None
    def git(*cmd):
        return subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, check=False).stdout.strip()
    top = git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != root.resolve():
        return None
    return git("rev-parse", "HEAD") or None


def _load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tutorial(root: Path):
    """docs/en/Research_Tutorial/train_from_scratch.py: AAADiT, AAAImagePipeline, AAATrainingModule."""
    return _load_file("diffsynth_train_from_scratch", root / "docs" / "en" / "Research_Tutorial" / "train_from_scratch.py")


def qwen_train_example(root: Path):
    """examples/qwen_image/model_training/train.py: QwenImageTrainingModule."""
    return _load_file("diffsynth_qwen_image_train", root / "examples" / "qwen_image" / "model_training" / "train.py")


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class TimingLogger:
    """Stands in for DiffSynth's `ModelLogger` in `launch_training_task`: times steps, stops after `total`."""

    def __init__(self, clock: StepClock, total: int):
        self.clock, self.total, self.losses = clock, total, []

    def on_step_end(self, accelerator, model, save_steps=None, **kwargs):
        self.clock.tick()
        if kwargs.get("loss") is not None:
            self.losses.append(float(kwargs["loss"]))
        if self.clock.steps >= self.total:
            raise Finished()

    def on_epoch_end(self, *args, **kwargs):
        pass

    def on_training_end(self, *args, **kwargs):
        pass


def run_launch_training_task(accelerator, dataset, model, device, *, warmup: int, steps: int, lr: float,
                             num_workers: int) -> dict:
    """DiffSynth's own training loop, timed step by step."""
    from diffsynth.diffusion import launch_training_task

    clock = StepClock(device, warmup)
    logger = TimingLogger(clock, warmup + steps)
    clock.start()
    try:
        launch_training_task(accelerator, dataset, model, logger, learning_rate=lr, num_workers=num_workers,
                             save_steps=None, num_epochs=10**6)
    except Finished:
        pass
    out = clock.summary(images_per_step=1)
    out["losses"] = logger.losses
    return out


def _accelerator(device: torch.device, find_unused: bool = False):
    import accelerate

    handlers = [accelerate.DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused else []
    return accelerate.Accelerator(gradient_accumulation_steps=1, cpu=device.type == "cpu", kwargs_handlers=handlers)


# ----------------------------------------------------------------------------------------------------------
# AAADiT from scratch: the tutorial's loop (batch 1, text encoder and VAE every step)

class _ImageRows(torch.utils.data.Dataset):
    """What `UnifiedDataset` gives for images already at the target size: {"image": PIL, "prompt": str}."""

    load_from_cache = False

    def __init__(self, folder: Path, repeat: int):
        import csv

        with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
            self.rows = [(folder / r["image"], r["prompt"]) for r in csv.DictReader(f)]
        self.repeat = repeat

    def __len__(self):
        return len(self.rows) * self.repeat

    def __getitem__(self, i):
        from PIL import Image

        path, prompt = self.rows[i % len(self.rows)]
        return {"image": Image.open(path).convert("RGB"), "prompt": prompt}


def aaadit_sft(settings: dict) -> dict:
    root = locate()
    if root is None:
        return skipped()
    device = setup_torch(settings)
    notes = import_diffsynth(root)
    from diffsynth.models.flux2_vae import Flux2VAE
    from diffsynth.models.z_image_text_encoder import ZImageTextEncoder

    from bench import workloads

    tut = tutorial(root)
    tiny = settings["tiny"]
    tok = workloads.tokenizer()
    # DiffSynth's wrapper class around the same Qwen3Model (ZImageTextEncoder only knows named sizes).
    encoder = ZImageTextEncoder.__new__(ZImageTextEncoder)
    torch.nn.Module.__init__(encoder)
    encoder.model = workloads.qwen3_encoder(tiny, tok)
    vae = Flux2VAE(**(workloads.FLUX2_VAE_TINY if tiny else workloads.FLUX2_VAE))
    vae.load_state_dict(workloads.flux2_vae(tiny).state_dict())
    ours = workloads.aaadit(tiny)

    def from_pretrained(torch_dtype, device, **kwargs):
        pipe = tut.AAAImagePipeline(device=device, torch_dtype=torch_dtype)
        pipe.text_encoder = encoder.to(device=device, dtype=torch_dtype)
        pipe.vae = vae.to(device=device, dtype=torch_dtype)
        pipe.tokenizer = tok
        return pipe

    make_dit = functools.partial(tut.AAADiT, dim=ours.config.width)
    with patched(tut.AAAImagePipeline, "from_pretrained", staticmethod(from_pretrained)), \
            patched(tut, "AAADiT", make_dit):
        model = tut.AAATrainingModule(device=device)
    model.pipe.dit.load_state_dict(ours.state_dict())  # the same weights as our side
    del ours
    folder = Path(settings["dataset"])
    if "torchvision" in notes["placeholder_imports"]:
        dataset, data = _ImageRows(folder, repeat=10**4), "PIL loader (torchvision not installed here; images are already the target size)"
    else:
        from diffsynth.core import UnifiedDataset

        size = settings["image_size"]
        dataset = UnifiedDataset(base_path=str(folder), metadata_path=str(folder / "metadata.csv"),
                                 max_data_items=10_000_000, data_file_keys=("image",),
                                 main_data_operator=UnifiedDataset.default_image_operator(
                                     base_path=str(folder), height=size, width=size))
        data = "UnifiedDataset (the tutorial's)"
    out = run_launch_training_task(_accelerator(device), dataset, model, device, warmup=settings["warmup"],
                                   steps=settings["steps"], lr=2e-4, num_workers=settings["num_workers"])
    out.update(diffsynth=notes, data=data, dtype="bf16 weights, bf16 AdamW (the tutorial's AAADiT().to(bf16))",
               batch=1, cached=False, text_encoder_and_vae="every step (tutorial)")
    return out


# ----------------------------------------------------------------------------------------------------------
# Qwen-Image: the training module of examples/qwen_image/model_training/train.py

def qwen_pipeline(device, num_layers: int, *, text_encoder=None, vae=None, tokenizer=None):
    """A `QwenImagePipeline` with DiffSynth's own `QwenImageDiT` (random bf16, full width, `num_layers`)."""
    from diffsynth.models.qwen_image_dit import QwenImageDiT
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    from bench.common import build_on

    pipe = QwenImagePipeline(device=device, torch_dtype=torch.bfloat16)
    pipe.dit = build_on(device, torch.bfloat16, lambda: QwenImageDiT(num_layers=num_layers))
    pipe.text_encoder, pipe.vae, pipe.tokenizer = text_encoder, vae, tokenizer
    return pipe


def qwen_training_module(root: Path, pipe, device, *, task: str, rank: int, gradient_checkpointing: bool,
                         extra_inputs: str | None):
    """DiffSynth's `QwenImageTrainingModule(...)` exactly as its train.py builds it (LoRA on the DiT with its
    targets), with only `from_pretrained` returning our locally built pipeline."""
    example = qwen_train_example(root)
    with patched(example.QwenImagePipeline, "from_pretrained", staticmethod(lambda **kwargs: pipe)):
        return example.QwenImageTrainingModule(lora_base_model="dit", lora_target_modules=QWEN_LORA_TARGETS,
                                               lora_rank=rank, use_gradient_checkpointing=gradient_checkpointing,
                                               extra_inputs=extra_inputs, task=task, device=device)


class _Cached(torch.utils.data.Dataset):
    """DiffSynth's split-training cache items (`load_from_cache`): (inputs_shared, inputs_posi, inputs_nega)."""

    load_from_cache = True

    def __init__(self, item: tuple, length: int):
        self.item, self.length = item, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.item


def _cached_item(settings: dict, *, distill: bool) -> tuple:
    from bench import workloads

    h = w = settings["image_size"]
    emb = workloads.qwen_text_embeds(1, settings["text_tokens"], "cpu", torch.bfloat16)
    shared = {"height": h, "width": w, "input_latents": workloads.qwen_latents(1, h, w, "cpu", torch.bfloat16),
              "cfg_scale": 1, "use_gradient_checkpointing": settings["gradient_checkpointing"],
              "use_gradient_checkpointing_offload": False,
              "edit_image_auto_resize": True, "zero_cond_t": False}
    if distill:
        # the seeded initial noise DiffSynth's NoiseInitializer draws (bf16 on the CPU generator)
        g = torch.Generator("cpu").manual_seed(0)
        shared.update(latents=torch.randn((1, 16, h // 8, w // 8), generator=g, dtype=torch.bfloat16),
                      num_inference_steps=settings["student_steps"], seed=0, rand_device="cpu")
    posi = {"prompt_emb": emb, "prompt_emb_mask": torch.ones(1, settings["text_tokens"], dtype=torch.long)}
    return shared, posi, {}


def qwen_lora_train(settings: dict) -> dict:
    """LoRA SFT (`sft:train`) or Direct Distill (`direct_distill:train`) from cached latents and embeddings."""
    root = locate()
    if root is None:
        return skipped()
    device = setup_torch(settings)
    notes = import_diffsynth(root)
    distill = settings["task"] == "direct_distill"
    pipe = qwen_pipeline(device, settings["num_layers"])
    task = "direct_distill:train" if distill else "sft:train"
    model = qwen_training_module(root, pipe, device, task=task, rank=settings["rank"],
                                 gradient_checkpointing=settings["gradient_checkpointing"],
                                 extra_inputs="seed,rand_device,num_inference_steps,cfg_scale" if distill else None)
    trainable = sum(p.numel() for p in model.trainable_modules())
    dataset = _Cached(_cached_item(settings, distill=distill), 10**6)
    out = run_launch_training_task(_accelerator(device, find_unused=True), dataset, model, device,
                                   warmup=settings["warmup"], steps=settings["steps"], lr=1e-4, num_workers=0)
    out.update(diffsynth=notes, task=task, batch=1, trainable_parameters=trainable,
               dtype="bf16 base, bf16 LoRA (upcast_dtype=pipe.torch_dtype)", lora_targets=QWEN_LORA_TARGETS,
               data="cached latents + prompt embeddings (DiffSynth's split training, load_from_cache)")
    return out


# ----------------------------------------------------------------------------------------------------------
# Teacher sampling: QwenImagePipeline.__call__ per image, as its Direct Distill docs generate the dataset

def qwen_generate(settings: dict) -> dict:
    root = locate()
    if root is None:
        return skipped()
    device = setup_torch(settings)
    notes = import_diffsynth(root)
    from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
    from diffsynth.models.qwen_image_vae import QwenImageVAE

    from bench import workloads

    tiny = settings["tiny"]
    tok = workloads.tokenizer()
    ours_te = workloads.qwen_text_encoder(tiny, tok)
    encoder = QwenImageTextEncoder.__new__(QwenImageTextEncoder)  # its class around the same Qwen2.5-VL weights
    torch.nn.Module.__init__(encoder)
    encoder.model = ours_te.model
    vae = QwenImageVAE(**(workloads.QWEN_VAE_TINY if tiny else workloads.QWEN_VAE))
    vae_note = "QwenImageVAE random init (same config as ours)"
    try:
        vae.load_state_dict(workloads.qwen_vae(tiny).state_dict())
        vae_note = "QwenImageVAE with our VAE's weights"
    except RuntimeError:
        pass
    pipe = qwen_pipeline(device, settings["num_layers"], text_encoder=encoder.to(device, torch.bfloat16),
                         vae=vae.to(device, torch.bfloat16), tokenizer=tok)
    pipe.eval()
    prompts = workloads.prompts(settings["warmup"] + settings["images"])
    out_dir = Path(settings["work"]) / "diffsynth_images"
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = StepClock(device, settings["warmup"], PeakMemory(device))
    clock.start()
    for i, prompt in enumerate(prompts):
        image = pipe(prompt, seed=i, num_inference_steps=settings["teacher_steps"], cfg_scale=settings["teacher_cfg"],
                     height=settings["image_size"], width=settings["image_size"], rand_device="cpu",
                     progress_bar_cmd=lambda x: x)
        image.save(out_dir / f"image_{i}.jpg")  # as in docs/en/Training/Direct_Distill.md
        clock.tick()
    out = clock.summary(images_per_step=1)
    out.update(diffsynth=notes, batch=1, vae=vae_note, note="QwenImagePipeline.__call__ per image: text encoder "
               "(positive and negative), denoise with two DiT calls per step (CFG), VAE decode, JPEG save")
    free(device)
    return out
