"""Loss nodes: Direct Distill Loss, Flow-Matching Loss, DMD Loss and Trajectory Loss, each a `DD_LOSS` description
the trainer builds.

Input names and their order are part of every saved workflow: never rename, remove or reorder them; add new inputs
at the end of "optional".
"""

from __future__ import annotations

from dit_distillery.errors import DistilleryError
from dit_distillery.losses import loss_from_dict
from dit_distillery.schedule import templates

from .common import LOSS, TRAIN_CATEGORY

FAMILY_SCHEDULE = "family"  # the DiT family's own schedule template


class DirectDistillLoss:
    DESCRIPTION = ("DiffSynth's Direct Distill: the student runs its own few-step sampler (e.g. 4 steps, CFG 1) from "
                   "each row's seeded noise, with gradients through every step, and its result is pulled onto the "
                   "teacher's. Use with a dataset from Generate Distill Dataset (it stores each row's seed and the "
                   "teacher's exact final latents).")
    CATEGORY = TRAIN_CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (LOSS,)
    RETURN_NAMES = ("loss",)
    OUTPUT_TOOLTIPS = ("The loss, for Train LoRA / Full.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "student_steps": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip":
                              "Steps of the student's sampler; 0 = each row's num_inference_steps (set by Generate "
                              "Distill Dataset), else default_steps."}),
            "student_cfg": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1, "tooltip":
                            "CFG of the student's sampler; -1 = each row's cfg_scale, else default_cfg. 1 = no CFG "
                            "(the usual target: half the compute at sampling)."}),
            "schedule_mu": (["resolution", "diffsynth"], {"default": "resolution", "tooltip":
                            "The student's sigma schedule: resolution (the one it samples with at that size) or "
                            "diffsynth (DiffSynth's fixed training shift 0.8)."}),
            "target": (["auto", "latents", "image"], {"default": "auto", "tooltip":
                       "What the student is pulled onto: latents (the teacher's stored final latents, exact), image "
                       "(the VAE encoding of the teacher's image, DiffSynth's way), auto (latents when stored)."}),
            "default_steps": ("INT", {"default": 4, "min": 1, "max": 100, "tooltip":
                              "Student steps when neither student_steps nor the row gives them."}),
            "default_cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip":
                            "Student CFG when neither student_cfg nor the row gives it."}),
        }, "optional": {
            "schedule_template": ([FAMILY_SCHEDULE, *templates()], {"default": FAMILY_SCHEDULE, "tooltip":
                                  "The student's sigma schedule: the family's, or another one it will be sampled "
                                  "with (Qwen-Image-Lightning for a student with a Lightning LoRA merged: mu = ln 3 at "
                                  "every size). Sample's schedule_template draws with the same."}),
        }}

    def make(self, student_steps, student_cfg, schedule_mu, target, default_steps, default_cfg,
             schedule_template=FAMILY_SCHEDULE):
        spec = {"kind": "direct_distill", "steps": student_steps or None,
                "cfg": None if student_cfg < 0 else float(student_cfg), "mu": schedule_mu, "target": target,
                "default_steps": int(default_steps), "default_cfg": float(default_cfg)}
        if schedule_template not in (None, "", FAMILY_SCHEDULE):
            if schedule_template not in templates():
                raise DistilleryError("schedule_template", schedule_template, "unknown schedule template.",
                                      f"use '{FAMILY_SCHEDULE}' or one of {list(templates())}.")
            spec["template"] = schedule_template
        loss_from_dict(spec)  # bad settings fail here, on this node
        return (spec,)


class FlowMatchingLoss:
    DESCRIPTION = ("Flow-matching SFT (DiffSynth's FlowMatchSFTLoss): noise an image to a random sigma and train the "
                   "DiT to predict the velocity noise - image. The defaults reproduce DiffSynth; uniform and "
                   "logit-normal sigma sampling are options. For LoRA/full fine-tuning and training from scratch.")
    CATEGORY = TRAIN_CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (LOSS,)
    RETURN_NAMES = ("loss",)
    OUTPUT_TOOLTIPS = ("The loss, for Train LoRA / Full.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sigma_sampling": (["diffsynth", "uniform", "logit_normal"], {"default": "diffsynth", "tooltip":
                               "How the noise level is drawn: diffsynth (uniform over the shifted training grid), "
                               "uniform, or logit_normal (SD3's, mean/std below)."}),
            "weighting": (["diffsynth", "none"], {"default": "diffsynth", "tooltip":
                          "Per-sample loss weight: diffsynth (Gaussian around sigma 0.5, mean 1) or none."}),
            "schedule_mu": (["diffsynth", "resolution"], {"default": "diffsynth", "tooltip":
                            "Shift of the training grid: diffsynth (0.8) or resolution (the image size's own)."}),
            "logit_mean": ("FLOAT", {"default": 0.0, "min": -5.0, "max": 5.0, "step": 0.05,
                                     "tooltip": "logit_normal only: mean."}),
            "logit_std": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 5.0, "step": 0.05,
                                    "tooltip": "logit_normal only: standard deviation."}),
            "min_sigma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Lowest noise level trained (fraction of the range)."}),
            "max_sigma": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Highest noise level trained (fraction of the range)."}),
        }}

    def make(self, sigma_sampling, weighting, schedule_mu, logit_mean, logit_std, min_sigma, max_sigma):
        spec = {"kind": "flow_matching", "sigma_sampling": sigma_sampling, "weighting": weighting, "mu": schedule_mu,
                "logit_mean": float(logit_mean), "logit_std": float(logit_std), "min_sigma": float(min_sigma),
                "max_sigma": float(max_sigma)}
        loss_from_dict(spec)
        return (spec,)


class DMDLoss:
    DESCRIPTION = ("DMD2 (distribution matching, no GAN): the student's few-step samples are pushed toward the "
                   "teacher's distribution by the difference of two scores: the frozen teacher with CFG (real) and a "
                   "LoRA on the teacher trained online on the student's samples (fake). Needs prompts only (Prompts "
                   "Dataset); a Generate Distill Dataset folder also gives teacher latents for the optional "
                   "regression term. With mode lora the student, the teacher and the fake score share one base "
                   "model; a student DiT of its own (e.g. Shrink DiT's) needs Train's teacher input.")
    CATEGORY = TRAIN_CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (LOSS,)
    RETURN_NAMES = ("loss",)
    OUTPUT_TOOLTIPS = ("The loss, for Train LoRA / Full.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "student_steps": ("INT", {"default": 4, "min": 0, "max": 16, "tooltip":
                              "Steps of the student's sampler (1, 2 or 4 usual); 0 = each row's "
                              "num_inference_steps, else 4. The student runs at CFG 1."}),
            "teacher_cfg": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip":
                            "CFG of the teacher (the real score): the guidance the student learns to produce "
                            "without CFG."}),
            "fake_updates": ("INT", {"default": 5, "min": 1, "max": 20, "tooltip":
                             "Updates of the fake score per student update (DMD2's two time-scale rule: 5), each "
                             "on the next batch of the dataset."}),
            "fake_rank": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip":
                          "Rank of the fake score's LoRA on the teacher (the family's LoRA targets)."}),
            "fake_learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6, "tooltip":
                                   "Learning rate of the fake score; 0 = the training's learning rate."}),
            "regression_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip":
                                  "Weight of Direct Distill on the dataset's teacher latents (DMD's regression "
                                  "term); 0 = none. Used only when the rows have teacher latents."}),
            "min_sigma": ("FLOAT", {"default": 0.02, "min": 0.001, "max": 1.0, "step": 0.01, "tooltip":
                          "Lowest noise level where the two scores are compared (DMD: 0.02)."}),
            "max_sigma": ("FLOAT", {"default": 0.98, "min": 0.001, "max": 1.0, "step": 0.01, "tooltip":
                          "Highest noise level where the two scores are compared (DMD: 0.98)."}),
            "schedule_mu": (["resolution", "diffsynth"], {"default": "resolution", "tooltip":
                            "The student's sigma schedule: resolution (the one it samples with at that size) or "
                            "diffsynth (DiffSynth's fixed training shift 0.8)."}),
        }}

    def make(self, student_steps, teacher_cfg, fake_updates, fake_rank, fake_learning_rate, regression_weight,
             min_sigma, max_sigma, schedule_mu):
        spec = {"kind": "dmd", "steps": int(student_steps) or None, "teacher_cfg": float(teacher_cfg),
                "fake_updates": int(fake_updates), "fake_rank": int(fake_rank),
                "fake_lr": float(fake_learning_rate) or None, "regression_weight": float(regression_weight),
                "min_sigma": float(min_sigma), "max_sigma": float(max_sigma), "mu": schedule_mu}
        loss_from_dict(spec)
        return (spec,)


class TrajectoryLoss:
    DESCRIPTION = ("Trajectory imitation (DiffSynth's, as used for Z-Image): at each of its few steps the student, "
                   "started on the teacher's recorded many-step trajectory, must step onto it again. One DiT call "
                   "per step, no unrolling. Needs a Generate Distill Dataset folder made with record_trajectory > 0.")
    CATEGORY = TRAIN_CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (LOSS,)
    RETURN_NAMES = ("loss",)
    OUTPUT_TOOLTIPS = ("The loss, for Train LoRA / Full.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "student_steps": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip":
                              "Steps of the student's sampler; 0 = each row's num_inference_steps, else 4."}),
            "student_cfg": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1, "tooltip":
                            "CFG of the student's sampler; -1 = each row's cfg_scale, else 1."}),
            "schedule_mu": (["resolution", "diffsynth"], {"default": "resolution", "tooltip":
                            "The student's sigma schedule: resolution (the one it samples with at that size) or "
                            "diffsynth (DiffSynth's fixed training shift 0.8)."}),
            "weighting": (["none", "diffsynth"], {"default": "none", "tooltip":
                          "Per-step weight: none, or diffsynth (its Gaussian training weight of each step's sigma, "
                          "small near pure noise)."}),
            "image_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip":
                             "Weight of an image-space term: the student's full sample decoded by the VAE vs the "
                             "teacher's image (pixel MSE; grads through the VAE decoder: memory). 0 = none."}),
        }}

    def make(self, student_steps, student_cfg, schedule_mu, weighting, image_weight):
        spec = {"kind": "trajectory", "steps": int(student_steps) or None,
                "cfg": None if student_cfg < 0 else float(student_cfg), "mu": schedule_mu, "weighting": weighting,
                "image_weight": float(image_weight)}
        loss_from_dict(spec)
        return (spec,)


NODE_CLASS_MAPPINGS = {"DD_DirectDistillLoss": DirectDistillLoss, "DD_FlowMatchingLoss": FlowMatchingLoss,
                       "DD_DMDLoss": DMDLoss, "DD_TrajectoryLoss": TrajectoryLoss}
NODE_DISPLAY_NAME_MAPPINGS = {"DD_DirectDistillLoss": "Direct Distill Loss", "DD_FlowMatchingLoss": "Flow-Matching Loss",
                              "DD_DMDLoss": "DMD Loss", "DD_TrajectoryLoss": "Trajectory Loss"}
