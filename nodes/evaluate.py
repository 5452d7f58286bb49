"""Evaluate Student: a student against its teacher and its undistilled base on held-out prompt/seed pairs
(`dit_distillery.evaluate`), as a table, a JSON report and a grid (teacher | undistilled | student).

The student's base is what Load Student (or Train) started from: the first pipeline up its chain of derived
pipelines. Unless connected otherwise, it is both the teacher (sampled at teacher_steps/teacher_cfg) and the
undistilled baseline (sampled at the student's steps and CFG).

Input names and their order are part of every saved workflow: never rename, remove or reorder them; add new inputs
at the end of "optional".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dit_distillery.errors import DistilleryError

from .common import (DATASET, NONE, PIPELINE, STUDENT_CATEGORY, Progress, _walk, model_dirs, pil_to_image,
                     resolve_name, user_errors)

CLIP_KINDS = ("text_encoders", "clip_vision")  # where a transformers CLIPModel folder is looked for


def list_clip_folders() -> list[str]:
    """Folders under ComfyUI's text_encoders / clip_vision folders holding a transformers CLIPModel (config.json
    with model_type "clip" and safetensors weights)."""
    found = set()
    for kind in CLIP_KINDS:
        for root in model_dirs(kind):
            for rel, files in _walk(root):
                if rel == "." or "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
                    continue
                try:
                    with open(Path(root) / rel / "config.json", encoding="utf-8") as f:
                        if json.load(f).get("model_type") == "clip":
                            found.add(rel)
                except (OSError, ValueError, AttributeError):
                    continue
    return sorted(found)


def _clip_path(name: str) -> str | None:
    if name in (None, "", NONE):
        return None
    roots = [r for kind in CLIP_KINDS for r in model_dirs(kind)]
    return str(resolve_name(name, "clip_model", roots, listed=list_clip_folders, kind="dir", missing=(
        f"not found in ComfyUI's {' or '.join(CLIP_KINDS)} folders.",
        "put the CLIP model folder (config.json, model.safetensors, tokenizer, preprocessor_config.json) there "
        "and refresh the page (press R), or pick [none].")))


def _base_of(ref):
    """The first pipeline of a derived chain (Load Pipeline's output), or None when `ref` is not derived."""
    root = ref
    while getattr(root, "parent", None) is not None:
        root = root.parent
    return None if root is ref else root


class EvaluateStudent:
    DESCRIPTION = ("Measures a few-step student against its many-step teacher on held-out prompt/seed pairs, next "
                   "to its undistilled base at the same steps: paired latent MSE and their ratio, PSNR and SSIM of "
                   "the images, diversity across seeds (mode collapse shows as a ratio well below 1), images/s at "
                   "both step counts, colour/shape/background accuracy on the synthetic shapes task, and the CLIP "
                   "score when a local CLIP model is picked. Nothing is downloaded.")
    CATEGORY = STUDENT_CATEGORY
    FUNCTION = "evaluate"
    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("table", "grid", "report_json")
    OUTPUT_TOOLTIPS = ("The metrics as a text table, with the ratios and notes.",
                       "One row per pair: teacher | undistilled at the student's steps | student.",
                       "Every metric as JSON.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "student": (PIPELINE, {"tooltip": "The student (Load Student, Train)."}),
                "prompts": ("STRING", {"multiline": True, "default": "", "tooltip":
                            "Held-out prompts, one per line (# lines skipped), or the name of a .txt file in "
                            "ComfyUI's input folder. Empty: synthetic_prompts shapes captions. Ignored when "
                            "teacher_dataset is connected."}),
                "synthetic_prompts": ("INT", {"default": 8, "min": 0, "max": 10000, "tooltip":
                                      "When prompts is empty: this many captions of the synthetic shapes task."}),
                "seeds_per_prompt": ("INT", {"default": 2, "min": 1, "max": 1000, "tooltip":
                                     "Seeds per prompt; 2 or more measure the diversity across seeds."}),
                "start_seed": ("INT", {"default": 100000, "min": 0, "max": 2 ** 32 - 1,
                                       "control_after_generate": False, "tooltip":
                                       "First held-out seed (keep them apart from the training dataset's)."}),
                "steps": ("INT", {"default": 4, "min": 0, "max": 1000, "tooltip":
                          "Student (and baseline) steps; 0 = the teacher dataset's student steps."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 50.0, "step": 0.1, "tooltip":
                        "Student (and baseline) CFG; -1 = the teacher dataset's student CFG."}),
                "teacher_steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip":
                                  "Teacher steps (a teacher pipeline; a dataset has its own)."}),
                "teacher_cfg": ("FLOAT", {"default": 4.0, "min": 0.01, "max": 50.0, "step": 0.1, "tooltip":
                                "Teacher CFG (a teacher pipeline; a dataset has its own)."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16,
                                  "tooltip": "Image width; 0 = the student's default (a dataset has its own)."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16,
                                   "tooltip": "Image height; 0 = the student's default (a dataset has its own)."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "Images per batch."}),
                "grid_rows": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip": "Rows of the grid."}),
                "clip_model": ([NONE] + list_clip_folders(), {"default": NONE, "tooltip":
                               "A transformers CLIPModel folder (safetensors) in models/text_encoders or "
                               "models/clip_vision for the CLIP score; [none] skips it."}),
            },
            "optional": {
                "teacher": (PIPELINE, {"tooltip": "The teacher; default: the student's base."}),
                "teacher_dataset": (DATASET, {"tooltip": "A Generate Distill Dataset of held-out rows: its stored "
                                    "teacher latents, seeds and settings are used instead of sampling a teacher."}),
                "baseline": (PIPELINE, {"tooltip": "The undistilled model sampled at the student's steps; default: "
                             "the student's base."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def evaluate(self, student, prompts, synthetic_prompts, seeds_per_prompt, start_seed, steps, cfg, teacher_steps,
                 teacher_cfg, width, height, batch_size, grid_rows, clip_model, teacher=None, teacher_dataset=None,
                 baseline=None, unique_id=None):
        from dit_distillery.evaluate import evaluate_student, held_out_pairs
        from dit_distillery.gen_dataset import read_prompts

        from .data import _prompt_source

        clip_path = _clip_path(clip_model)
        base = _base_of(student)
        dataset_path = None
        if teacher_dataset is not None:
            dataset_path = (getattr(teacher_dataset, "spec", None) or {}).get("path")
            if not dataset_path or not os.path.isdir(dataset_path):
                raise DistilleryError("teacher_dataset", getattr(teacher_dataset, "summary", teacher_dataset),
                                      "is not a dataset folder.", "connect Generate Distill Dataset's dataset output.")
            if teacher is not None:
                raise DistilleryError("teacher_dataset", dataset_path, "both a teacher and a teacher dataset are "
                                      "connected.", "disconnect one of them.")
            pairs = (None, None)
        else:
            if teacher is None and base is None:
                raise DistilleryError("teacher", None, "the student is not derived from a base pipeline, so there is "
                                      "no default teacher.", "connect a teacher pipeline or a teacher_dataset.")
            pairs = held_out_pairs(read_prompts(_prompt_source(prompts, int(synthetic_prompts))),
                                   int(seeds_per_prompt), int(start_seed))
        progress = Progress(1, unique_id)
        with user_errors(progress):
            student_pipe = student.load()
            teacher_pipe = None if dataset_path else (teacher or base).load()
            baseline_ref = baseline or base
            baseline_pipe = baseline_ref.load() if baseline_ref is not None else None
            evaluation = evaluate_student(
                student_pipe, teacher=teacher_pipe, teacher_dataset=dataset_path, baseline=baseline_pipe,
                prompts=pairs[0], seeds=pairs[1], steps=int(steps) or None, cfg=None if cfg < 0 else float(cfg),
                teacher_steps=int(teacher_steps), teacher_cfg=float(teacher_cfg), height=int(height) or None,
                width=int(width) or None, batch_size=int(batch_size), clip_model=clip_path, grid_rows=int(grid_rows),
                progress=progress, stop=progress.stop)
        text = evaluation.table
        report = json.dumps(evaluation.metrics, default=str)
        return {"ui": {"text": [text]}, "result": (text, pil_to_image([evaluation.grid]), report)}


NODE_CLASS_MAPPINGS = {"DD_EvaluateStudent": EvaluateStudent}
NODE_DISPLAY_NAME_MAPPINGS = {"DD_EvaluateStudent": "Evaluate Student"}
