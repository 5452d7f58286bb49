"""Training: one job description (`job`), the accelerate loop (`loop`), safetensors-only checkpoints (`state`)."""

from .job import DataSpec, LoraSpec, ModelSpec, OptimSpec, OutputSpec, TrainJob, ValidationSpec
from .loop import Callbacks, StepInfo, Trainer, TrainingDiverged, TrainResult, train

__all__ = ["TrainJob", "ModelSpec", "DataSpec", "LoraSpec", "OptimSpec", "OutputSpec", "ValidationSpec", "train",
           "Trainer", "TrainResult", "StepInfo", "Callbacks", "TrainingDiverged"]
