"""Training: one job description (`job`), its set-up (`setup`), the step loop on accelerate (`loop`), the run's
state, checkpoints and weights (`checkpoints`, on disk as `state` writes them: safetensors + JSON only), and the
held-out loss, validation grids and chart (`validation`)."""

from .job import DataSpec, LoraSpec, ModelSpec, OptimSpec, OutputSpec, TrainJob, ValidationSpec
from .loop import Callbacks, StepInfo, Trainer, TrainingDiverged, TrainResult, train
from .setup import load_job_pipeline, lr_factor, prepare_data

__all__ = ["TrainJob", "ModelSpec", "DataSpec", "LoraSpec", "OptimSpec", "OutputSpec", "ValidationSpec", "train",
           "Trainer", "TrainResult", "StepInfo", "Callbacks", "TrainingDiverged", "lr_factor", "prepare_data",
           "load_job_pipeline"]
