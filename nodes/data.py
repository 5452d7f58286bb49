"""Dataset nodes: Dataset (Folder), Synthetic Shapes Dataset, Dataset from Images, Generate Distill Dataset, Prompts
Dataset.

Each returns a `DD_DATASET`: the TrainJob `data` section (a folder and how to size, bucket, repeat and cache it),
checked when the node runs, so a missing file or a bad row is reported on the dataset node, not mid-training.

Input names and their order are part of every saved workflow: never rename, remove or reorder them; add new inputs
at the end of "optional".
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from dit_distillery.errors import DistilleryError

from .common import (DATA_CATEGORY, DATASET, PIPELINE, input_dir, inside_folders, lines, output_dir, path_inside,
                     pil_to_image, resolve_name, stat_key)
from .refs import DatasetRef

SIZING = ("buckets", "fixed")


def _sizing_inputs() -> dict:
    return {
        "sizing": (list(SIZING), {"default": "buckets", "tooltip":
                   "buckets: each image keeps its aspect ratio, shrunk to at most max_pixels (DiffSynth's dynamic "
                   "resolution); batches are formed from same-size images. fixed: every image is cropped and "
                   "resized to width x height."}),
        "width": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                          "tooltip": "fixed sizing: image width in pixels."}),
        "height": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                           "tooltip": "fixed sizing: image height in pixels."}),
        "max_pixels": ("INT", {"default": 1024 * 1024, "min": 256, "max": 64 * 1024 * 1024, "step": 256,
                               "tooltip": "buckets sizing: largest image area in pixels (larger images are shrunk, "
                                          "never enlarged)."}),
    }


def _common_inputs() -> dict:
    return {
        "repeat": ("INT", {"default": 1, "min": 1, "max": 10000,
                           "tooltip": "Times each sample is seen per epoch (DiffSynth's --dataset_repeat)."}),
        "cache": ("BOOLEAN", {"default": True, "tooltip": "Encode latents and prompts once and train the DiT alone "
                              "(the text encoder and VAE leave the GPU). Off: encode every step."}),
    }


def _spec(sizing, width, height, max_pixels, repeat, cache, **extra) -> dict:
    if sizing not in SIZING:
        raise DistilleryError("sizing", sizing, "unknown sizing.", f"use one of {list(SIZING)}.")
    fixed = sizing == "fixed"
    return {"height": int(height) if fixed else None, "width": int(width) if fixed else None,
            "max_pixels": int(max_pixels), "repeat": int(repeat), "cache": bool(cache), **extra}


def _summary(metadata, spec: dict) -> str:
    sizing = f"{spec['width']}x{spec['height']}" if spec.get("height") else f"buckets up to {spec['max_pixels']} px"
    first = metadata.rows[0]
    text = (f"{len(metadata)} samples from {metadata.source} ({sizing}, repeat {spec['repeat']}, "
            f"cache {'on' if spec['cache'] else 'off'})\nfirst: {first.where}: {first.prompt[:120]!r}")
    if metadata.skipped:
        text += f"\nskipped {metadata.skipped} bad rows, first: {metadata.reasons[0]}"
    return text


class DatasetFolder:
    DESCRIPTION = ("A training dataset on disk: a DiffSynth-format folder (images + metadata.csv/.json/.jsonl with "
                   "image and prompt columns; seed, cfg and teacher-latents columns for distillation), or a folder of "
                   "images with same-name .txt captions. Every row is checked now.")
    CATEGORY = DATA_CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("The dataset (for Train).", "Rows found, sizing, the first sample.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "", "tooltip": "The dataset folder, relative to ComfyUI's input folder "
                                  "(or to output/dit_distillery, where this pack writes datasets); an absolute path "
                                  "only inside those. Its files must be inside them too (no '..', no symlink out)."}),
            "metadata": ("STRING", {"default": "", "tooltip": "The metadata file, relative to the folder (e.g. "
                                    "../metadata.csv beside it) or absolute, inside the same folders; empty = "
                                    "metadata.csv/.jsonl/.json in the folder, else .txt captions."}),
            **_sizing_inputs(),
            **_common_inputs(),
            "on_error": (["raise", "skip"], {"default": "raise", "tooltip":
                         "A bad row (missing image, unreadable number): stop with its line number, or skip it "
                         "(counted in the summary)."}),
            "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip":
                                "Probability of training a sample with the empty prompt (teaches the unconditional "
                                "branch CFG uses; DiffSynth uses 0)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder="", metadata="", **_):
        try:
            base = _folder(folder)
            meta = _metadata_path(base, metadata)
        except DistilleryError:
            return f"{folder}|{metadata}"
        return stat_key(meta if meta is not None else base, *sorted(base.glob("metadata.*")))

    def make(self, folder, metadata, sizing, width, height, max_pixels, repeat, cache, on_error, caption_dropout):
        from dit_distillery.data import read_metadata

        base = _folder(folder)
        meta = _metadata_path(base, metadata)
        rows = read_metadata(base, meta, on_error=on_error)
        _check_rows_inside(rows)
        spec = _spec(sizing, width, height, max_pixels, repeat, cache, path=str(base),
                     metadata=None if meta is None else str(meta), on_error=on_error,
                     caption_dropout=float(caption_dropout))
        summary = _summary(rows, spec)
        return (DatasetRef(spec, len(rows), summary), summary)


def data_roots() -> list[Path]:
    """Where datasets may be read from by name: ComfyUI's input folder, and output/dit_distillery (the datasets
    and runs this pack wrote). See `common.resolve_name`."""
    return [input_dir(), output_dir() / "dit_distillery"]


def _folder(folder: str) -> Path:
    text = str(folder or "").strip()
    if not text:
        raise DistilleryError("folder", folder, "no dataset folder given.",
                              "type the folder's path relative to ComfyUI's input folder.")
    return resolve_name(text, "folder", data_roots(), allow_absolute=True, kind="dir", missing=(
        f"no such folder in {input_dir()} (or {output_dir() / 'dit_distillery'}).",
        "give the dataset folder that holds the images and the metadata file, inside ComfyUI's input folder."))


def _metadata_path(base: Path, metadata: str) -> Path | None:
    text = str(metadata or "").strip()
    if not text:
        return None
    return resolve_name(text, "metadata", [base], within=data_roots(), allow_absolute=True, allow_parent=True,
                        kind="file", missing=(f"no such file in {base}.", "give the metadata file's name inside the "
                                              "folder, or leave it empty for metadata.csv/.jsonl/.json."))


def _check_rows_inside(rows) -> None:
    """The images and latents a metadata file names must be inside the same folders as the metadata itself."""
    roots = data_roots()
    for row in rows:
        for path in (row.image, row.latents):
            if path is not None and not inside_folders(path, roots):
                raise DistilleryError("metadata", row.where, f"names a file outside ComfyUI's input folder "
                                      f"({path.name}); only files inside {input_dir()} (or output/dit_distillery) "
                                      "may be read.", "copy the images into the dataset folder and use paths "
                                      "relative to it.")


class SyntheticShapesDataset:
    DESCRIPTION = ("The built-in dataset: coloured shapes on coloured backgrounds with captions ('a red circle on a "
                   "blue background'), generated from a seed. Small enough that the demo DiT learns it on a CPU in "
                   "minutes; the pack's benchmark checks whether a model draws what the prompt asked.")
    CATEGORY = DATA_CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (DATASET, "IMAGE", "STRING")
    RETURN_NAMES = ("dataset", "preview", "summary")
    OUTPUT_TOOLTIPS = ("The dataset (for Train).", "The first 16 images.", "Where it was written.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "count": ("INT", {"default": 256, "min": 1, "max": 100000, "tooltip": "Number of images."}),
            "size": ("INT", {"default": 32, "min": 16, "max": 1024, "step": 16, "tooltip": "Image side in pixels."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 32 - 1, "control_after_generate": False,
                             "tooltip": "Seed of the shapes, colours and positions."}),
            **_common_inputs(),
        }, "optional": {
            "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.95, "step": 0.01, "tooltip":
                                "Fraction of steps trained on the empty prompt, so CFG has an unconditional "
                                "branch to use (0 = DiffSynth's behaviour; ~0.1 for a teacher you will sample "
                                "with CFG)."}),
        }}

    def make(self, count, size, seed, repeat, cache, caption_dropout=0.0):
        from dit_distillery.data import read_metadata, write_dataset
        from dit_distillery.data.images import load_image

        folder = _shapes_folder(count, size, seed)
        if not (folder / "metadata.csv").is_file():  # written last: its presence means the folder is complete
            write_dataset(folder, int(count), seed=int(seed), size=int(size))
        rows = read_metadata(folder)
        spec = {"path": str(folder), "synthetic": {"count": int(count), "size": int(size), "seed": int(seed)},
                "height": int(size), "width": int(size), "repeat": int(repeat), "cache": bool(cache),
                "caption_dropout": float(caption_dropout)}
        preview = pil_to_image([load_image(r.image) for r in rows.rows[:16]])
        summary = _summary(rows, spec)
        return (DatasetRef(spec, len(rows), summary), preview, summary)


def _shapes_folder(count, size, seed) -> Path:
    return path_inside(output_dir() / "dit_distillery" / "datasets", f"shapes_{count}x{size}px_seed{seed}", "count")


class DatasetFromImages:
    DESCRIPTION = ("Turns images made in the graph (e.g. by a stock Qwen-Image KSampler workflow) and their captions "
                   "into a DiffSynth-format dataset folder in ComfyUI's output folder, for training.")
    CATEGORY = DATA_CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("The dataset (for Train).", "Where it was written.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The training images (a batch)."}),
            "captions": ("STRING", {"multiline": True, "default": "", "tooltip":
                         "One caption per image, one per line (a single line is used for every image)."}),
            "name": ("STRING", {"default": "my_dataset", "tooltip":
                     "Folder name in output/dit_distillery/datasets (rewritten on every run)."}),
            **_sizing_inputs(),
            **_common_inputs(),
        }}

    def make(self, images, captions, name, sizing, width, height, max_pixels, repeat, cache):
        from dit_distillery.data import read_metadata
        from dit_distillery.formats import atomic_output, atomic_write_text

        from .common import image_to_pil

        prompts = lines(captions)
        count = int(images.shape[0])
        if len(prompts) == 1:
            prompts = prompts * count
        if len(prompts) != count:
            raise DistilleryError("captions", f"{len(prompts)} lines", f"{count} images need {count} captions (or one "
                                  "for all).", "write one caption per line, in the order of the images.")
        folder = path_inside(output_dir() / "dit_distillery" / "datasets", name, "name")
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["image", "prompt"])
        for i, (image, prompt) in enumerate(zip(image_to_pil(images), prompts)):
            file = f"{i:05d}.png"
            with atomic_output(folder / file) as tmp:
                image.save(tmp, format="PNG")
            writer.writerow([file, prompt])
        atomic_write_text(folder / "metadata.csv", table.getvalue())
        rows = read_metadata(folder)
        spec = _spec(sizing, width, height, max_pixels, repeat, cache, path=str(folder))
        summary = _summary(rows, spec)
        return (DatasetRef(spec, len(rows), summary), summary)


class GenerateDistillDataset:
    DESCRIPTION = ("Makes a Direct-Distill dataset: the teacher pipeline samples every (prompt, seed) with many steps "
                   "and CFG, and the folder keeps each image, the teacher's exact final latents, the seed and the "
                   "student's steps/CFG (DiffSynth's format). Progress per image; Cancel keeps every finished row, "
                   "and queueing again with the same settings only generates the missing rows.")
    CATEGORY = DATA_CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = (DATASET, "IMAGE", "STRING")
    RETURN_NAMES = ("dataset", "preview", "report")
    OUTPUT_TOOLTIPS = ("The dataset (for Train with Direct Distill Loss).", "The first 16 teacher images.",
                       "Rows written, skipped and repaired; speed.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "teacher": (PIPELINE, {"tooltip": "The teacher pipeline (e.g. Qwen-Image from Load Pipeline)."}),
                "prompts": ("STRING", {"multiline": True, "default": "", "tooltip":
                            "One prompt per line (# lines skipped), or the name of a .txt file in ComfyUI's input "
                            "folder. Empty with synthetic_prompts > 0: the shapes vocabulary."}),
                "synthetic_prompts": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip":
                                      "When prompts is empty: this many captions of the synthetic shapes task."}),
                "seeds_per_prompt": ("INT", {"default": 1, "min": 1, "max": 10000,
                                             "tooltip": "Images per prompt (different seeds)."}),
                "start_seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 32 - 1, "control_after_generate": False,
                                       "tooltip": "Seed of the first row; prompt p, image k gets start_seed + p x "
                                                  "seeds_per_prompt + k."}),
                "teacher_steps": ("INT", {"default": 40, "min": 1, "max": 1000, "tooltip": "Teacher sampling steps."}),
                "teacher_cfg": ("FLOAT", {"default": 4.0, "min": 0.01, "max": 50.0, "step": 0.1,
                                          "tooltip": "Teacher CFG."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Teacher negative prompt."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16,
                                  "tooltip": "Image width; 0 = the teacher's default."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16,
                                   "tooltip": "Image height; 0 = the teacher's default."}),
                "student_steps": ("INT", {"default": 4, "min": 1, "max": 1000, "tooltip":
                                  "Steps the student will sample with (stored per row for Direct Distill)."}),
                "student_cfg": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 50.0, "step": 0.1, "tooltip":
                                "CFG the student will sample with (1 = none: half the compute)."}),
                "rand_device": (["cpu", "cuda"], {"default": "cpu", "tooltip":
                                "Where the initial noise is drawn (DiffSynth's default: cpu); the student draws the "
                                "same."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "Teacher images per batch."}),
                "output_name": ("STRING", {"default": "distill_dataset", "tooltip":
                                "Folder name in output/dit_distillery/datasets (one teacher set-up per folder)."}),
                **_common_inputs(),
            },
            "optional": {
                "record_trajectory": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                                      "Also store the teacher's latents before this many of its steps (evenly "
                                      "spread, the first its noise) beside each row's final latents: what the "
                                      "Trajectory Loss imitates. 0 = none (Direct Distill and DMD need none). At "
                                      "most teacher_steps."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def generate(self, teacher, prompts, synthetic_prompts, seeds_per_prompt, start_seed, teacher_steps,
                 teacher_cfg, negative_prompt, width, height, student_steps, student_cfg, rand_device, batch_size,
                 output_name, repeat, cache, record_trajectory=0, unique_id=None):
        from dit_distillery.data import read_metadata
        from dit_distillery.data.images import load_image
        from dit_distillery.gen_dataset import generate_distill_dataset, read_prompts

        from .common import Progress, free_comfy_memory, user_errors

        folder = path_inside(output_dir() / "dit_distillery" / "datasets", output_name, "output_name")
        prompt_list = _prompt_source(prompts, int(synthetic_prompts))
        progress = Progress(1, unique_id)
        free_comfy_memory()  # a long many-step teacher run: ComfyUI's own loaded models make room
        with user_errors(progress):
            pipe = teacher.load()
            report = generate_distill_dataset(
                pipe, read_prompts(prompt_list), folder, seeds_per_prompt=int(seeds_per_prompt),
                start_seed=int(start_seed), teacher_steps=int(teacher_steps), teacher_cfg=float(teacher_cfg),
                negative_prompt=str(negative_prompt), height=height or None, width=width or None,
                student_steps=int(student_steps), student_cfg=float(student_cfg), rand_device=rand_device,
                batch_size=int(batch_size), record_trajectory=int(record_trajectory), progress=progress,
                stop=progress.stop)
        rows = read_metadata(folder)
        w, h = report["size"]
        spec = {"path": str(folder), "height": int(h), "width": int(w), "repeat": int(repeat), "cache": bool(cache)}
        preview = pil_to_image([load_image(r.image) for r in rows.rows[:16]])
        text = (f"{report['rows_in_metadata']} rows in {folder} ({report['rows_written']} written, "
                f"{report['rows_skipped']} already there, {report['rows_repaired']} repaired; "
                f"{report['images_per_second']} images/s)\nteacher {report['teacher_steps']} steps CFG "
                f"{report['teacher_cfg']:g} -> student {report['student_steps']} steps CFG {report['student_cfg']:g}, "
                f"{w}x{h}")
        return (DatasetRef(spec, len(rows), text), preview, text)


def _prompt_source(prompts: str, synthetic: int):
    """The prompts widget as `read_prompts` takes it: a list of prompts (never a string, which the core would
    read as a path if it named a file), the checked path of a prompts file in ComfyUI's input folder, or the
    synthetic shapes' captions when it is empty. A single line that looks like a path (absolute, '..', a
    prompts-file suffix, or a file in the input folder) is a file name and goes through `resolve_name`."""
    from dit_distillery.gen_dataset import PROMPT_FILE_SUFFIXES, synthetic_prompts

    text = str(prompts or "").strip()
    if not text:
        if synthetic > 0:
            return synthetic_prompts(synthetic)
        raise DistilleryError("prompts", prompts, "no prompts.", "write one prompt per line, give a .txt file, or "
                              "set synthetic_prompts for the shapes task.")
    if "\n" not in text:
        looks_like_path = (text.startswith(("/", "\\")) or Path(text).is_absolute() or ".." in re.split(r"[\\/]", text)
                           or Path(text).suffix.lower() in PROMPT_FILE_SUFFIXES or (input_dir() / text).is_file())
        if looks_like_path:
            return resolve_name(text, "prompts", [input_dir()], allow_absolute=True, kind="file", missing=(
                f"no such file in ComfyUI's input folder ({input_dir()}).",
                "put the prompts file in the input folder and give its name, or write the prompts themselves."))
    return [line for line in lines(text) if not line.startswith("#")]


class PromptsDataset:
    DESCRIPTION = ("Prompts only, no images: the data of DMD Loss (the student learns from the teacher's scores on "
                   "its own samples, so no teacher images are needed). The text is encoded once and cached; the "
                   "samples are width x height. Losses that train on images refuse it.")
    CATEGORY = DATA_CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("The dataset (for Train LoRA / Full with DMD Loss).", "Prompts found and the sample size.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "One prompt per line."}),
            "width": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                              "tooltip": "Width of the student's samples in pixels."}),
            "height": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                               "tooltip": "Height of the student's samples in pixels."}),
            **_common_inputs(),
            "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip":
                                "Probability of a sample with the empty prompt."}),
        }}

    def make(self, prompts, width, height, repeat, cache, caption_dropout):
        from dit_distillery.data.metadata import prompt_rows

        found = lines(prompts)
        if not found:
            raise DistilleryError("prompts", prompts, "no prompt given.", "write one prompt per line.")
        prompt_rows(found)
        spec = {"prompts": found, "height": int(height), "width": int(width), "repeat": int(repeat),
                "cache": bool(cache), "caption_dropout": float(caption_dropout)}
        summary = (f"{len(found)} prompts, samples {int(width)}x{int(height)} (repeat {int(repeat)}, cache "
                   f"{'on' if cache else 'off'})\nfirst: {found[0][:120]!r}")
        return (DatasetRef(spec, len(found), summary), summary)


NODE_CLASS_MAPPINGS = {
    "DD_DatasetFolder": DatasetFolder,
    "DD_SyntheticShapesDataset": SyntheticShapesDataset,
    "DD_DatasetFromImages": DatasetFromImages,
    "DD_GenerateDistillDataset": GenerateDistillDataset,
    "DD_PromptsDataset": PromptsDataset,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DD_DatasetFolder": "Dataset (Folder)",
    "DD_SyntheticShapesDataset": "Synthetic Shapes Dataset",
    "DD_DatasetFromImages": "Dataset from Images",
    "DD_GenerateDistillDataset": "Generate Distill Dataset",
    "DD_PromptsDataset": "Prompts Dataset",
}
