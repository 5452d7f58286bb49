"""Evaluate Student: how close a few-step student comes to its many-step teacher, next to what the same steps give
without distillation, on held-out prompt/seed pairs.

Every model samples the same (prompt, seed) pairs from the same noise (`noise.initial_noise`, DiffSynth's draw),
so each student image has a teacher image to be compared with:

* paired latent MSE to the teacher, for the student and for the undistilled baseline (the student's base without
  its LoRA/weights, sampled at the student's steps and CFG) and their ratio: below 1 means distillation helped;
* PSNR and SSIM of the decoded images against the teacher's (pixels in [-1, 1], so the data range is 2: the usual
  PSNR/SSIM of [0, 1] images); SSIM is Wang et al.'s (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), written
  here in torch because no declared dependency provides it;
* diversity: the mean pairwise RMS pixel distance between images of the same prompt from different seeds, for the
  student and the teacher, and their ratio. Few-step distillation (DMD's known failure) can collapse modes: a
  student close to the teacher on average but drawing the same image for every seed shows a ratio well below 1;
* speed: images/s of the student at its steps and of the teacher at its steps (prompt encoding, denoising and
  decoding), timed in the same run on the same machine after an untimed warm-up;
* on the embedded task (every prompt a synthetic-shapes caption) the colour/shape/background accuracy read back by
  `data.synthetic.classify_image`;
* CLIP score when a transformers CLIPModel folder (safetensors) is given; nothing is ever downloaded. LPIPS is not
  offered: its released weights are pickled `.pth` files, and this pack reads weights from safetensors only.

The teacher is a pipeline (sampled here, many steps with CFG), or a Generate Distill Dataset folder whose rows
(prompt, seed, rand_device) and stored final latents are reused instead of re-sampled: give one generated for
evaluation, with seeds the training set does not use, or the numbers are training-pair numbers.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import DistilleryError

HELD_OUT_START_SEED = 100_000  # seeds of held-out pairs: gen-dataset starts at 0, so a teacher dataset avoids them
HELD_OUT_PROMPT_SEED = 7  # `gen_dataset.synthetic_prompts` seed of the held-out synthetic prompts (the demo's)
DATA_RANGE = 2.0  # pixels are in [-1, 1]
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03  # Wang et al. 2004
LPIPS_NOTE = ("LPIPS not available: its released weights are pickled .pth files, and DiT Distillery reads weights "
              "from safetensors only.")
RESULT_NAMES = {"json": "evaluation.json", "grid": "grid.png", "table": "evaluation.txt"}


# ----------------------------------------------------------------------------------------------------------
# Metrics on tensors (pixels [B, 3, H, W] in [-1, 1], latents [B, C, h, w])

def _paired(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.dim() < 2:
        raise DistilleryError(what, f"{tuple(a.shape)} vs {tuple(b.shape)}", "the two batches must have the same "
                              "shape [B, ...].", "compare samples of the same pairs at the same size.")
    return a.detach().double().cpu(), b.detach().double().cpu()


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair mean squared difference, [B]."""
    a, b = _paired(a, b, "latents")
    return ((a - b) ** 2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-image PSNR in dB, [B]; +inf for identical images."""
    a, b = _paired(a, b, "images")
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)  # x / 0 = inf, log10(inf) = inf


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image SSIM, [B] (mean of the SSIM map over the window positions inside the image and the channels).

    Wang et al. 2004 with a Gaussian window (11, sigma 1.5; shrunk to the image for images smaller than that) and
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, L the data range. Computed image by image in float64, so a 1024 px batch
    needs a few tens of MB, not a batch's worth of maps."""
    a, b = _paired(a, b, "images")
    if a.dim() != 4:
        raise DistilleryError("images", tuple(a.shape), "SSIM takes [B, C, H, W] images.", "pass decoded pixels.")
    channels, height, width = a.shape[1:]
    size = min(window, height, width)
    size -= 1 - size % 2  # odd, so the window has a centre
    g = _gaussian(size, sigma)
    rows, cols = g.view(1, 1, size, 1).repeat(channels, 1, 1, 1), g.view(1, 1, 1, size).repeat(channels, 1, 1, 1)

    def blur(x):  # separable Gaussian, valid positions only
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, rows, groups=channels), cols, groups=channels)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    out = []
    for x, y in zip(a.split(1), b.split(1)):
        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        out.append(ssim_map.mean())
    return torch.stack(out)


def diversity(pixels: torch.Tensor, prompts: list[str]) -> float | None:
    """Mean pairwise RMS distance between images of the same prompt (different seeds), averaged over the prompts
    that have at least two images (each prompt counts once); None when none has."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    x = pixels.detach().double().cpu().flatten(1)
    per_prompt = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        d = torch.cdist(x[idx], x[idx]) / math.sqrt(x.shape[1])  # L2 / sqrt(n) = RMS distance
        k = len(idx)
        per_prompt.append(float(d.sum() / (k * (k - 1))))  # the zero diagonal is left out of the mean
    return sum(per_prompt) / len(per_prompt) if per_prompt else None


def colour_shape_accuracy(images, prompts) -> dict:
    """Fraction of images whose shape / colour / background (and all three) match the prompt."""
    from .data.synthetic import classify_image, parse_caption

    got = [classify_image(im) for im in images]  # (colour, shape, background), as parse_caption
    want = [parse_caption(p) for p in prompts]
    n = len(prompts)
    return {"colour": sum(g[0] == w[0] for g, w in zip(got, want)) / n,
            "shape": sum(g[1] == w[1] for g, w in zip(got, want)) / n,
            "background": sum(g[2] == w[2] for g, w in zip(got, want)) / n,
            "all": sum(tuple(g) == tuple(w) for g, w in zip(got, want)) / n}


def is_synthetic(prompts: list[str]) -> bool:
    """Whether every prompt is a caption of the synthetic shapes task (then accuracy can be read back)."""
    from .data.synthetic import parse_caption

    return bool(prompts) and all(parse_caption(p) is not None for p in prompts)


# ----------------------------------------------------------------------------------------------------------
# CLIP score (local weights only)

@dataclass
class ClipScorer:
    """A transformers CLIPModel with its tokenizer and image processor, read from a local folder (safetensors)."""

    model: object
    tokenizer: object
    processor: object
    path: str

    @classmethod
    def load(cls, folder: str | os.PathLike, field_name: str = "clip_model") -> "ClipScorer":
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = Path(folder)
        fix = ("give a local folder of a transformers CLIPModel (config.json, model.safetensors, tokenizer and "
               "preprocessor_config.json; e.g. openai/clip-vit-base-patch32 saved with save_pretrained), or none.")
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DistilleryError(field_name, str(folder), "is not a model folder (no config.json).", fix)
        if not any(path.glob("*.safetensors")):
            raise DistilleryError(field_name, str(folder), "holds no .safetensors weights (pickled weights are never "
                                  "read).", fix)
        try:
            model = CLIPModel.from_pretrained(path, use_safetensors=True, local_files_only=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DistilleryError(field_name, str(folder), f"cannot be loaded as a CLIPModel ({exc}).", fix) from exc
        return cls(model, tokenizer, processor, str(path))

    @torch.no_grad()
    def score(self, images, prompts: list[str], batch_size: int = 32) -> float:
        """Mean of 100 * max(cos(image, text), 0) (torchmetrics' CLIPScore)."""
        max_len = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        scores = []
        for s in range(0, len(prompts), batch_size):
            text = self.tokenizer(prompts[s:s + batch_size], padding=True, truncation=True, max_length=max_len,
                                  return_tensors="pt")
            pixels = self.processor(images=[im.convert("RGB") for im in images[s:s + batch_size]],
                                    return_tensors="pt")["pixel_values"]
            t = self.model.get_text_features(input_ids=text["input_ids"], attention_mask=text.get("attention_mask"))
            v = self.model.get_image_features(pixel_values=pixels)
            t, v = [getattr(f, "pooler_output", f) for f in (t, v)]  # a tensor, or an output object in newer versions
            cos = torch.nn.functional.cosine_similarity(t.float(), v.float(), dim=-1)
            scores.append(100 * cos.clamp(min=0))
        return float(torch.cat(scores).mean())


# ----------------------------------------------------------------------------------------------------------
# Samples of the held-out pairs

@dataclass
class Samples:
    """One model's images of the held-out pairs (or the teacher dataset's stored ones)."""

    latents: torch.Tensor  # [B, C, h, w] float32, CPU
    pixels: torch.Tensor   # [B, 3, H, W] in [-1, 1], CPU
    images: list           # PIL
    prompts: list[str]
    seeds: list[int]
    steps: int
    cfg: float
    seconds: float | None = None  # sampling wall time (None: not sampled here)
    source: str = "pipeline"

    @property
    def images_per_s(self) -> float | None:
        return len(self.prompts) / self.seconds if self.seconds else None


@dataclass
class Settings:
    """How every model samples the pairs besides its own steps/CFG: the same for teacher, baseline and student."""

    height: int
    width: int
    negative_prompt: str = ""
    rand_device: str = "cpu"
    batch_size: int | None = None


def held_out_pairs(prompts: list[str], seeds_per_prompt: int = 2,
                   start_seed: int = HELD_OUT_START_SEED) -> tuple[list[str], list[int]]:
    """(prompts, seeds) with `seeds_per_prompt` rows per prompt, seeds numbered as gen-dataset numbers them
    (`gen_dataset.seed_for`) from `start_seed`: two or more seeds per prompt give the diversity measure."""
    from .gen_dataset import _whole, read_prompts, seed_for

    prompts = read_prompts(list(prompts))
    spp = _whole("seeds_per_prompt", seeds_per_prompt, 1)
    start = _whole("start_seed", start_seed, 0)
    pairs = [(p, seed_for(i, k, start_seed=start, seeds_per_prompt=spp)) for i, p in enumerate(prompts)
             for k in range(spp)]
    return [p for p, _ in pairs], [s for _, s in pairs]


class _StepCounter:
    """One progress(done, total) over several sampling runs, in image-steps (a run of n images at s steps is n * s
    of them, whatever its batching: `sample`'s callback counts steps over all its batches)."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.done = progress, max(1, total), 0

    def callback(self, units: int):
        if self.progress is None:
            return None
        base = self.done
        return lambda step, run_total, _preview=None: self.progress(base + units * step // max(1, run_total),
                                                                    self.total)

    def finish(self, steps: int) -> None:
        self.done += steps
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


def sample_pairs(pipe, prompts: list[str], seeds: list[int], *, steps: int, cfg: float, settings: Settings,
                 callback=None, stop=None, warm_up: bool = True) -> Samples:
    """Sample every pair (latents and images), timed after an untimed one-step warm-up on one batch (first-call
    costs such as kernel selection and allocator growth must not count against whichever model runs first)."""
    common = dict(negative_prompt=settings.negative_prompt, height=settings.height, width=settings.width,
                  rand_device=settings.rand_device, stop=stop)
    if warm_up:
        first = settings.batch_size or len(prompts)
        pipe.sample(prompts[:first], seeds=seeds[:first], steps=1, cfg_scale=cfg, output="both", **common)
    start = time.perf_counter()
    result = pipe.sample(prompts, seeds=seeds, steps=steps, cfg_scale=cfg, output="both", callback=callback,
                         batch_size=settings.batch_size, **common)
    seconds = time.perf_counter() - start  # results are on the CPU, so the device has finished
    return Samples(result.latents, result.pixels, result.images, list(prompts), list(seeds), steps, float(cfg),
                   seconds)


def read_teacher_dataset(folder: str | os.PathLike, pipe, *, max_pairs: int | None = None,
                         field_name: str = "teacher_dataset") -> tuple[Samples, Settings, dict]:
    """The teacher's samples from a Generate Distill Dataset folder: its rows' prompts and seeds and stored final
    latents (decoded with `pipe`'s codec), the settings the teacher sampled with, and the folder's settings file.

    Rows are ordered by prompt (first appearance), so a prompt's seeds are adjacent. The latents must have the
    shape `pipe` makes at the folder's size (the same codec), else the comparison would mean nothing."""
    import json

    from safetensors.torch import load_file

    from .data.metadata import read_metadata
    from .gen_dataset import FORMAT, SETTINGS_NAME
    from .pipelines.base import to_pil

    path = Path(folder)
    settings_file = path / SETTINGS_NAME
    fix = "give a folder written by Generate Distill Dataset (gen-dataset), or a teacher pipeline instead."
    if not settings_file.is_file():
        raise DistilleryError(field_name, str(folder), "is not a Generate Distill Dataset folder (no "
                              f"{SETTINGS_NAME}).", fix)
    try:
        info = json.loads(settings_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DistilleryError(field_name, str(settings_file), f"unreadable ({exc}).", fix) from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DistilleryError(field_name, str(settings_file), "is not a gen-dataset settings file.", fix)
    rows = [r for r in read_metadata(path).rows if r.latents is not None and r.seed is not None]
    if not rows:
        raise DistilleryError(field_name, str(folder), "has no rows with stored latents and seeds.", fix)
    order = {p: i for i, p in reversed(list(enumerate(r.prompt for r in rows)))}
    rows = sorted(rows, key=lambda r: (order[r.prompt], r.seed))
    if max_pairs is not None:
        rows = rows[:max_pairs]
    settings = Settings(int(info["height"]), int(info["width"]), str(info.get("negative_prompt", "")),
                        str(info.get("rand_device", "cpu")))
    want = tuple(pipe.latent_shape(settings.height, settings.width))
    latents = torch.stack([load_file(str(r.latents))["latents"].float() for r in rows])
    if tuple(latents.shape[1:]) != want:
        raise DistilleryError(field_name, str(folder), f"its latents are {list(latents.shape[1:])} at "
                              f"{settings.width}x{settings.height}; the student's codec makes {list(want)}.",
                              "evaluate with the VAE/codec the teacher dataset was made with.")
    pixels = torch.cat([pipe.decode(chunk.to(pipe.device)) for chunk in latents.split(16)])
    teacher = Samples(latents, pixels, to_pil(pixels), [r.prompt for r in rows], [r.seed for r in rows],
                      int(info["teacher_steps"]), float(info["teacher_cfg"]), None, f"dataset {path}")
    return teacher, settings, info


# ----------------------------------------------------------------------------------------------------------
# Scores and the report

def compare(samples: Samples, reference: Samples) -> dict:
    """Latent MSE (mean and standard error), PSNR and SSIM of `samples` against the reference (same pairs).

    PSNR is averaged over the images that differ (an identical image has no finite PSNR; `identical_images` counts
    them, and `psnr_db` is None when all are identical)."""
    if (samples.prompts, samples.seeds) != (reference.prompts, reference.seeds):
        raise DistilleryError("pairs", len(samples.prompts), "the samples are not of the reference's prompt/seed "
                              "pairs.", "sample the same pairs as the teacher.")
    mse = latent_mse(samples.latents, reference.latents)
    db = psnr(samples.pixels, reference.pixels)
    finite = db[torch.isfinite(db)]
    n = len(mse)
    return {"latent_mse": float(mse.mean()), "latent_mse_se": float(mse.std() / math.sqrt(n)) if n > 1 else 0.0,
            "psnr_db": float(finite.mean()) if len(finite) else None, "identical_images": n - len(finite),
            "ssim": float(ssim(samples.pixels, reference.pixels).mean())}


def describe(samples: Samples, *, clip: ClipScorer | None = None) -> dict:
    """What a model's samples show on their own: steps/CFG, speed, diversity, accuracy (embedded task), CLIP."""
    out = {"steps": samples.steps, "cfg": samples.cfg,
           "images_per_s": round(samples.images_per_s, 4) if samples.images_per_s else None,
           "diversity": diversity(samples.pixels, samples.prompts)}
    if is_synthetic(samples.prompts):
        out["accuracy"] = colour_shape_accuracy(samples.images, samples.prompts)
    if clip is not None:
        out["clip_score"] = clip.score(samples.images, samples.prompts)
    return out


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def short_label(prompt: str) -> str:
    """A grid row label: a synthetic caption without articles and "background" ("red circle on blue")."""
    return re.sub(r"\ban? |( background$)", "", prompt)


def comparison_grid(columns: list[tuple[str, Samples]], rows: int = 8):
    """One row per pair (distinct prompts first), one column per model."""
    from .charts import image_grid

    first = columns[0][1]
    seen, order, rest = set(), [], []
    for i, p in enumerate(first.prompts):
        (rest if p in seen else order).append(i)
        seen.add(p)
    picked = (order + rest)[:max(1, rows)]
    labels = [f"{short_label(first.prompts[i])} (seed {first.seeds[i]})" for i in picked]
    return image_grid([[s.images[i] for _, s in columns] for i in picked], row_labels=labels,
                      col_labels=[name for name, _ in columns])


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(metrics: dict) -> str:
    """The metrics as a fixed-width text table plus ratio lines and notes (the node's STRING, evaluation.txt)."""
    rows = [(name, metrics[key]) for name, key in (("teacher", "teacher"), ("undistilled", "baseline"),
                                                   ("student", "student")) if metrics.get(key)]
    synthetic = any("accuracy" in m for _, m in rows)
    clip = any("clip_score" in m for _, m in rows)
    head = ["model", "steps", "cfg", "latent MSE", "PSNR dB", "SSIM", "diversity", "img/s"]
    head += ["accuracy"] * synthetic + ["CLIP"] * clip
    table = [head]
    for name, m in rows:
        db = "inf" if m.get("identical_images") and m.get("psnr_db") is None else _fmt(m.get("psnr_db"), ".2f")
        cells = [name, str(m["steps"]), f"{m['cfg']:g}", _fmt(m.get("latent_mse"), ".5f"), db,
                 _fmt(m.get("ssim"), ".4f"), _fmt(m.get("diversity"), ".4f"), _fmt(m.get("images_per_s"), ".3g")]
        if synthetic:
            cells.append(_fmt((m.get("accuracy") or {}).get("all"), ".0%"))
        if clip:
            cells.append(_fmt(m.get("clip_score"), ".2f"))
        table.append(cells)
    widths = [max(len(r[c]) for r in table) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    r = metrics["ratios"]
    lines += ["",
              f"student / undistilled latent MSE: {_fmt(r['mse_vs_baseline'], '.3f')} (below 1: distillation helped)",
              f"student / teacher diversity: {_fmt(r['diversity_vs_teacher'], '.3f')} (well below 1: mode collapse)",
              f"student / teacher speed: {_fmt(r['speedup_vs_teacher'], '.2f')}x",
              f"{metrics['pairs']} held-out pairs, {metrics['prompts']} prompts, {metrics['size'][0]}x"
              f"{metrics['size'][1]}"]
    lines += [f"note: {n}" for n in metrics["notes"]]
    return "\n".join(lines)


@dataclass
class Evaluation:
    """What `evaluate_student` gives: the metrics (JSON-ready), the text table, the grid image and the samples."""

    metrics: dict
    table: str
    grid: object  # PIL image
    samples: dict = field(default_factory=dict, repr=False)  # "teacher" / "baseline" / "student" -> Samples

    def save(self, out_dir: str | os.PathLike) -> dict:
        """Write evaluation.json, evaluation.txt and grid.png (each atomically) into `out_dir`; returns the paths."""
        from .formats import atomic_output, atomic_write_json, atomic_write_text

        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise DistilleryError("out", str(out), "exists and is not a folder.", "give a folder path.")
        out.mkdir(parents=True, exist_ok=True)
        paths = {k: out / name for k, name in RESULT_NAMES.items()}
        with atomic_output(paths["grid"]) as tmp:
            self.grid.save(tmp, format="PNG")
        atomic_write_text(paths["table"], self.table + "\n")
        atomic_write_json(paths["json"], self.metrics)
        return {k: str(p) for k, p in paths.items()}


def evaluate_student(student, *, teacher=None, teacher_dataset: str | os.PathLike | None = None, baseline=None,
                     prompts: list[str] | None = None, seeds: list[int] | None = None, steps: int | None = None,
                     cfg: float | None = None, teacher_steps: int = 50, teacher_cfg: float = 4.0,
                     negative_prompt: str = "", height: int | None = None, width: int | None = None,
                     rand_device: str = "cpu", batch_size: int | None = None, max_pairs: int | None = None,
                     clip_model: str | os.PathLike | None = None, grid_rows: int = 8,
                     progress: Callable[[int, int], None] | None = None, stop: Callable[[], bool] | None = None,
                     log: Callable[[str], None] | None = None) -> Evaluation:
    """Evaluate `student` (a `TextToImagePipeline`) on held-out pairs; see the module docstring.

    teacher: a pipeline sampled at `teacher_steps`/`teacher_cfg` on `prompts`/`seeds` (parallel lists; see
    `held_out_pairs`); or teacher_dataset: a gen-dataset folder whose rows, size, negative prompt and noise device
    are used (then prompts, seeds, size and teacher steps/CFG come from it, and `steps`/`cfg` default to the
    student settings it records). baseline: the undistilled pipeline sampled like the student (None: skipped).
    steps/cfg: the student's (default 4 and 1). Everything is checked before any sampling.
    """
    from .gen_dataset import _scale, _whole

    log = log or (lambda text: None)
    notes: list[str] = []
    # -- checks, before anything is sampled
    if teacher is None and teacher_dataset is None:
        raise DistilleryError("teacher", None, "no teacher to compare with.",
                              "give a teacher pipeline (many steps, CFG) or a Generate Distill Dataset folder.")
    if teacher is not None and teacher_dataset is not None:
        raise DistilleryError("teacher_dataset", str(teacher_dataset), "both a teacher pipeline and a teacher "
                              "dataset were given.", "give one of them.")
    if teacher_dataset is not None:
        for name, value in (("prompts", prompts), ("seeds", seeds), ("height", height), ("width", width)):
            if value is not None:
                raise DistilleryError(name, value, "the teacher dataset's rows fix the prompts, seeds and size.",
                                      f"leave {name} unset, or evaluate against a teacher pipeline.")
    else:
        if not prompts:
            raise DistilleryError("prompts", prompts, "no held-out prompts.", "give prompts (and seeds).")
        prompts = list(prompts)
        seeds = [HELD_OUT_START_SEED + i for i in range(len(prompts))] if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise DistilleryError("seeds", len(seeds), f"{len(seeds)} seeds for {len(prompts)} prompts.",
                                  "give one seed per prompt (see held_out_pairs).")
        from .noise import check_seeds

        check_seeds(seeds)
        teacher_steps, teacher_cfg = _whole("teacher_steps", teacher_steps, 1), _scale("teacher_cfg", teacher_cfg)
    if steps is not None:
        steps = _whole("steps", steps, 1)
    if cfg is not None:
        cfg = _scale("cfg", cfg)
    if max_pairs is not None:
        max_pairs = _whole("max_pairs", max_pairs, 1)
    grid_rows = _whole("grid_rows", grid_rows, 1)
    if batch_size is not None:
        batch_size = _whole("batch_size", batch_size, 1)
    clip = ClipScorer.load(clip_model) if clip_model else None
    if clip is None:
        notes.append("CLIP score skipped: no local CLIP model folder given (weights are never downloaded).")
    notes.append(LPIPS_NOTE)

    # -- the teacher's side
    if teacher_dataset is not None:
        reference, settings, info = read_teacher_dataset(teacher_dataset, student, max_pairs=max_pairs)
        steps = info.get("student_steps", 4) if steps is None else steps
        cfg = info.get("student_cfg", 1.0) if cfg is None else cfg
        prompts, seeds = reference.prompts, reference.seeds
    else:
        if max_pairs is not None:
            prompts, seeds = prompts[:max_pairs], seeds[:max_pairs]
        d = student.defaults
        settings = Settings(d["height"] if height is None else height, d["width"] if width is None else width,
                            negative_prompt, rand_device)
        student.latent_shape(settings.height, settings.width)
    settings.batch_size = batch_size
    steps, cfg = _whole("steps", 4 if steps is None else steps, 1), _scale("cfg", 1.0 if cfg is None else cfg)
    n = len(prompts)
    speed_pairs = min(n, batch_size or n)  # a dataset's teacher settings are timed on one batch of the baseline
    total = n * steps * (2 if baseline is not None else 1)
    total += n * teacher_steps if teacher is not None else speed_pairs * reference.steps if baseline is not None else 0
    counter = _StepCounter(progress, total)

    if teacher is not None:
        log(f"[evaluate] teacher: {n} pairs at {teacher_steps} steps, CFG {teacher_cfg:g}")
        reference = sample_pairs(teacher, prompts, seeds, steps=teacher_steps, cfg=teacher_cfg, settings=settings,
                                 callback=counter.callback(n * teacher_steps), stop=stop)
        counter.finish(n * teacher_steps)
    runs = {}
    if baseline is not None:
        log(f"[evaluate] undistilled baseline: {steps} steps, CFG {cfg:g}")
        runs["baseline"] = sample_pairs(baseline, prompts, seeds, steps=steps, cfg=cfg, settings=settings,
                                        callback=counter.callback(n * steps), stop=stop)
        counter.finish(n * steps)
    else:
        notes.append("no undistilled baseline: nothing to compare the student's MSE with.")
    log(f"[evaluate] student: {steps} steps, CFG {cfg:g}")
    runs["student"] = sample_pairs(student, prompts, seeds, steps=steps, cfg=cfg, settings=settings,
                                   callback=counter.callback(n * steps), stop=stop)
    counter.finish(n * steps)

    teacher_ips = reference.images_per_s
    if teacher is None:  # a dataset: time the teacher's settings on the baseline (the undistilled model)
        if baseline is not None:
            timed = sample_pairs(baseline, prompts[:speed_pairs], seeds[:speed_pairs], steps=reference.steps,
                                 cfg=reference.cfg, settings=settings,
                                 callback=counter.callback(speed_pairs * reference.steps), stop=stop)
            counter.finish(speed_pairs * reference.steps)
            teacher_ips = timed.images_per_s
            notes.append(f"teacher given as a dataset: its speed is the undistilled baseline's at the teacher's "
                         f"{reference.steps} steps, CFG {reference.cfg:g} ({speed_pairs} images).")
        else:
            notes.append("teacher given as a dataset and no baseline: the teacher's speed was not measured.")

    # -- scores
    metrics = {"pairs": n, "prompts": len(set(prompts)), "size": [settings.width, settings.height],
               "negative_prompt": settings.negative_prompt, "rand_device": settings.rand_device,
               "teacher": {**describe(reference, clip=clip), "source": reference.source,
                           "images_per_s": round(teacher_ips, 4) if teacher_ips else None},
               "baseline": None, "student": None, "clip_model": clip.path if clip else None, "lpips": None}
    for name, run in runs.items():
        metrics[name] = {**describe(run, clip=clip), **compare(run, reference)}
    s, b, t = metrics["student"], metrics["baseline"] or {}, metrics["teacher"]
    if t["diversity"] is None:
        notes.append("diversity needs two or more seeds per prompt: none here.")
    metrics["ratios"] = {"mse_vs_baseline": _ratio(s["latent_mse"], b.get("latent_mse")),
                         "diversity_vs_teacher": _ratio(s["diversity"], t["diversity"]),
                         "speedup_vs_teacher": _ratio(s["images_per_s"], t["images_per_s"])}
    metrics["notes"] = notes
    columns = [(f"teacher {reference.steps} st cfg {reference.cfg:g}", reference)]
    if "baseline" in runs:
        columns.append((f"undistilled {steps} st cfg {cfg:g}", runs["baseline"]))
    columns.append((f"student {steps} st cfg {cfg:g}", runs["student"]))
    grid = comparison_grid(columns, grid_rows)
    return Evaluation(metrics, format_table(metrics), grid, {"teacher": reference, **runs})
