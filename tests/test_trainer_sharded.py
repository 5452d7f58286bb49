"""Sharded full training (distributed "fsdp", trainer/sharded.py): the job's rules, the launch files, consolidation
(fast, one process), and 2 gloo processes training the tiny AAADiT sharded, killed and resumed (slow)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dit_distillery.errors import DistilleryError
from dit_distillery.formats import TensorSource
from dit_distillery.trainer.state import latest_checkpoint, list_checkpoints
from tests.trainer_helpers import make_job

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# The job

@pytest.mark.parametrize("overrides,field", [
    ({"distributed": "zero3"}, "distributed"),
    ({"distributed": "fsdp", "mode": "lora"}, "distributed"),
    ({"distributed": "fsdp", "optim": {"name": "adafactor"}}, "optim.name"),
    ({"distributed": "fsdp", "loss": {"kind": "dmd"}}, "loss.kind"),
])
def test_sharded_job_settings_are_checked(tmp_path, overrides, field):
    with pytest.raises(DistilleryError) as err:
        make_job(tmp_path, **overrides)
    assert err.value.field == field and err.value.fix


def test_fsdp_job_round_trips_and_keeps_the_fingerprint(tmp_path):
    job = make_job(tmp_path, distributed="fsdp")
    again = type(job).load(job.save(tmp_path / "job.json"))
    assert again.distributed == "fsdp"
    # a sharded or replicated run of the same job is the same training: resume tells them apart by their state
    assert job.fingerprint() == make_job(tmp_path).fingerprint()


def test_a_sharded_checkpoint_is_refused_by_a_run_that_is_not(tmp_path):
    from dit_distillery.trainer.sharded import check_resumable

    with pytest.raises(DistilleryError, match="sharded training"):
        check_resumable(tmp_path, {"sharded": True, "world_size": 2}, sharded=False, processes=1)
    with pytest.raises(DistilleryError, match="without sharding"):
        check_resumable(tmp_path, {"world_size": 2}, sharded=True, processes=2)
    with pytest.raises(DistilleryError, match="4 processes") as err:
        check_resumable(tmp_path, {"sharded": True, "world_size": 4}, sharded=True, processes=2)
    assert "launch 4" in err.value.fix
    check_resumable(tmp_path, {"sharded": True, "world_size": 2}, sharded=True, processes=2)


# ---------------------------------------------------------------------------------------------------------------
# The launch files

def test_launch_files_for_ddp_and_fsdp(tmp_path):
    import yaml

    from dit_distillery.trainer.launch import write_launch

    job = make_job(tmp_path / "run", distributed="fsdp", mixed_precision="auto")
    job_path = job.save(tmp_path / "job.json")
    config, command = write_launch(job, job_path, num_processes=8, block_classes=["AAADiTBlock"])
    assert command == f"accelerate launch --config_file {config} -m dit_distillery train {job_path}"
    data = yaml.safe_load(config.read_text())
    assert data["distributed_type"] == "FSDP" and data["num_processes"] == 8 and data["mixed_precision"] == "bf16"
    fsdp = data["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "AAADiTBlock"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_reshard_after_forward"] is True
    env = _launch_env(command)  # what accelerate launch gives the processes
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["FSDP_TRANSFORMER_CLS_TO_WRAP"]) == \
        ("true", "2", "AAADiTBlock")
    job.distributed = "ddp"
    config, command = write_launch(job, job_path, num_processes=8)
    data = yaml.safe_load(config.read_text())
    assert data["distributed_type"] == "MULTI_GPU" and "fsdp_config" not in data
    assert "ACCELERATE_USE_FSDP" not in _launch_env(command)
    config, _ = write_launch(job, job_path, num_processes=1)
    assert yaml.safe_load(config.read_text())["distributed_type"] == "NO"


def _launch_env(command: str) -> dict:
    import shlex

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(shlex.split(command)[2:])
    return prepare_multi_gpu_env(_validate_launch_command(args)[0])


# ---------------------------------------------------------------------------------------------------------------
# Consolidation, on one process: DCP's safetensors writer, our reader, the family's names and our metadata

def test_consolidate_writes_the_family_file(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from dit_distillery import families
    from dit_distillery.models.registry import load_dit
    from dit_distillery.trainer.sharded import SHARDS, consolidate, export_settings

    family = families.get("aaadit")
    dit = family.model_class()(**family.tiny_config())
    job = make_job(tmp_path, output={"save_dtype": "bf16", "name": "merged"})
    ckpt = tmp_path / "checkpoint-0000003"
    tensors = {f"model.{k}": v for k, v in dit.state_dict().items()}
    tensors["optim.state.x.exp_avg"] = torch.ones(3)  # not part of the weights file
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(ckpt / SHARDS), save_distributed=True),
             no_dist=True)
    (ckpt / "state.json").write_text(json.dumps({"export": export_settings(job, dit, 3)}))
    path = consolidate(ckpt)
    assert path == ckpt / "merged.safetensors"
    with TensorSource(path) as src:
        assert src.metadata["dit_distillery.family"] == families.of_model(dit).name
        assert json.loads(src.metadata["dit_distillery.training"])["steps"] == 3
        assert "optim.state.x.exp_avg" not in src.keys()
    loaded = load_dit(path, dtype=torch.float32)
    expected = {k: v.to(torch.bfloat16).float() for k, v in dit.state_dict().items()}
    assert all(torch.equal(loaded.state_dict()[k], expected[k]) for k in expected)
    with pytest.raises(DistilleryError, match="not a sharded checkpoint"):
        consolidate(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Two processes (gloo): sharded training = DDP; killed and resumed = uninterrupted, bit for bit

def _launch(job_path: Path, port: int, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), "-m", "dit_distillery", "train", str(job_path), "--json", "--quiet"],
                            cwd=REPO, env=env, text=True, **popen)


def _train(job, path: Path, port: int) -> dict:
    proc = _launch(job.save(path), port, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(reports) == 1
    return reports[0]


@pytest.mark.slow  # ~2-3 min on the shared 2-core CPU: four 2-process launches
def test_sharded_training_resumes_exactly_and_matches_ddp(tmp_path):
    common = dict(data={"synthetic": {"count": 4, "size": 32}}, optim={"lr": 1e-3, "grad_clip": 1.0},
                  output={"save_dtype": "fp32", "save_every": 1, "keep_last": 0}, ema_decay=0.9, batch_size=2)
    # killed mid-run (SIGKILL to every process), once it has written two checkpoints
    killed = make_job(tmp_path / "killed", steps=400, distributed="fsdp", **common)
    with open(tmp_path / "killed.log", "w") as log:
        proc = _launch(killed.save(tmp_path / "killed.json"), 29641, stdout=log, stderr=log)
        ckpts, deadline = tmp_path / "killed" / "checkpoints", time.time() + 300
        while time.time() < deadline and len(list_checkpoints(ckpts)) < 2 and proc.poll() is None:
            time.sleep(0.05)
        agent = psutil.Process(proc.pid)
        processes = [agent, *agent.children(recursive=True)]  # (torchrun starts each worker in its own session)
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        for p in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        proc.wait()
        psutil.wait_procs(processes, timeout=30)
    step = int(latest_checkpoint(ckpts).name.split("-")[1])
    assert step >= 2
    for ckpt in list_checkpoints(ckpts):  # complete ones only, each with its shards and consolidated file
        assert len(list((ckpt / "sharded").glob("*.safetensors"))) == 2
        assert (ckpt / "student.safetensors").is_file()
    total = step + 2
    resumed = _train(make_job(tmp_path / "killed", steps=total, distributed="fsdp", resume="auto", **common),
                     tmp_path / "resumed.json", 29642)
    unbroken = _train(make_job(tmp_path / "unbroken", steps=total, distributed="fsdp", **common),
                      tmp_path / "unbroken.json", 29643)
    ddp = _train(make_job(tmp_path / "ddp", steps=total, **common), tmp_path / "ddp.json", 29644)

    history = [json.loads(line)["loss"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    unbroken_history = [json.loads(line)["loss"]
                        for line in (tmp_path / "unbroken" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == total and history == unbroken_history
    a, b = load_file(resumed["weights"]), load_file(unbroken["weights"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    # the last sharded checkpoint (weights, AdamW states, EMA) is the same too
    shards = [load_file(str(p)) for run in ("killed", "unbroken")
              for p in sorted((tmp_path / run / "checkpoints" / f"checkpoint-{total:07d}" / "sharded").iterdir())]
    assert shards[0].keys() == shards[2].keys() and all(torch.equal(shards[0][k], shards[2][k]) for k in shards[0])
    assert any(k.startswith("ema.") for k in shards[0]) and any(k.startswith("optim.") for k in shards[0])

    # sharded = replicated, up to the order of float sums (reduce-scatter vs all-reduce): as in
    # test_two_processes_equal_one_with_the_doubled_batch, within a tenth of the learning rate
    c = load_file(ddp["weights"])
    assert c.keys() == b.keys()
    worst = max(float((b[k].float() - c[k].float()).abs().max()) for k in c)
    assert worst < 1e-4, worst
    assert unbroken["final_loss"] == pytest.approx(ddp["final_loss"], rel=1e-5)
