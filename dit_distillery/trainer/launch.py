"""The files that run a job on several GPUs: an accelerate config (DDP, or FSDP2 for distributed "fsdp") beside
the job, and the `accelerate launch --config_file ... -m dit_distillery train JOB` command (Export Training Job).

The job stays the source of truth: the trainer builds its own FSDP plugin from it (`sharded.fsdp_plugin`) and
refuses an FSDP config for a "ddp" job, so the config's FSDP section records the same settings for
`accelerate launch` (which reads it into the processes' environment). One machine; for several, edit
num_machines / machine_rank / main_process_ip in the file (accelerate's own keys).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..formats import atomic_write_text


def accelerate_config(job, num_processes: int, block_classes: list[str] | None = None) -> dict:
    """The accelerate config (what `accelerate config` writes) that launches `job` on `num_processes` GPUs."""
    precision = "bf16" if job.mixed_precision == "auto" else job.mixed_precision  # "auto" = bf16 on GPUs
    kind = "NO" if num_processes == 1 else "FSDP" if job.distributed == "fsdp" else "MULTI_GPU"
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": kind, "num_processes": num_processes,
              "num_machines": 1, "machine_rank": 0, "mixed_precision": precision, "use_cpu": False,
              "gpu_ids": "all", "rdzv_backend": "static", "same_network": True, "main_training_function": "main",
              "debug": False}
    if kind == "FSDP":
        config["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_offload_params": False, "fsdp_activation_checkpointing": False}
        if block_classes:  # the family's block classes (the trainer finds them itself; recorded here for reading)
            config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = ",".join(block_classes)
    return config


def write_launch(job, job_path: str | Path, num_processes: int,
                 block_classes: list[str] | None = None) -> tuple[Path, str]:
    """Write `<job>.accelerate.yaml` beside the job file; returns (its path, the launch command)."""
    import yaml

    job_path = Path(job_path)
    config = job_path.with_name(job_path.stem + ".accelerate.yaml")
    text = yaml.safe_dump(accelerate_config(job, num_processes, block_classes), sort_keys=False)
    atomic_write_text(config, f"# accelerate config of the DiT Distillery job {job_path.name}\n{text}")
    command = shlex.join(["accelerate", "launch", "--config_file", str(config), "-m", "dit_distillery", "train",
                          str(job_path)])
    return config, command
