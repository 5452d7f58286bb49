"""Loss nodes: Direct Distill Loss and Flow-Matching Loss, each a `DD_LOSS` description the trainer builds.

Input names and their order are part of every saved workflow: never rename, remove or reorder them; add new inputs
at the end of "optional".
"""

from __future__ import annotations

from dit_distillery.losses import loss_from_dict

from .common import LOSS, TRAIN_CATEGORY


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
        }}

    def make(self, student_steps, student_cfg, schedule_mu, target, default_steps, default_cfg):
        spec = {"kind": "direct_distill", "steps": student_steps or None,
                "cfg": None if student_cfg < 0 else float(student_cfg), "mu": schedule_mu, "target": target,
                "default_steps": int(default_steps), "default_cfg": float(default_cfg)}
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


NODE_CLASS_MAPPINGS = {"DD_DirectDistillLoss": DirectDistillLoss, "DD_FlowMatchingLoss": FlowMatchingLoss}
NODE_DISPLAY_NAME_MAPPINGS = {"DD_DirectDistillLoss": "Direct Distill Loss", "DD_FlowMatchingLoss": "Flow-Matching Loss"}
