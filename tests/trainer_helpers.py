"""A small training job on the tiny pipeline and the synthetic shapes, shared by the trainer tests."""

from dit_distillery.trainer import TrainJob


def make_job(out, **overrides) -> TrainJob:
    spec = {"model": {"pipeline": "tiny"},
            "data": {"synthetic": {"count": 8, "size": 32}, "height": 32, "width": 32},
            "loss": {"kind": "flow_matching"}, "mode": "full", "steps": 6, "batch_size": 2,
            "optim": {"lr": 1e-3}, "output": {"dir": str(out), "save_every": 0}, "resume": None}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return TrainJob.from_dict(spec)
