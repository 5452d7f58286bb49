"""Fault suite (issue 9, section 3): two runs in one output folder, and the leftovers of killed writes.

* A run holds a lock on its folder (dit_distillery.runlock.RunLock); a second run is refused naming the setting,
  the holder's pid and the fix; a dead holder's lock is taken over; the lock goes when a run raises.
* Killed writes leave `<name>.<pid>.<random>.tmp` files (formats.atomic_output) and `.checkpoint-<step>.<random>`
  folders (trainer.state.save_checkpoint); the next run removes exactly those, and only when no live writer
  holds them. Files with similar names are kept.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dit_distillery import runlock
from dit_distillery.errors import DistilleryError, StopRequested
from dit_distillery.formats import atomic_output
from dit_distillery.runlock import LOCK_NAME, RunLock, remove_leftovers
from tests.trainer_helpers import make_job

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time\nfrom dit_distillery.runlock import RunLock\nlock = RunLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\ntime.sleep(120)\n")
WRITE = ("import sys, time\nfrom dit_distillery.formats import atomic_output\n"
         "with atomic_output(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'x' * 4096)\n"
         "    print('writing', flush=True)\n    time.sleep(120)\n")


def dead_pid() -> int:
    """The pid of a process that has exited (what a killed run leaves in its lock and temp names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def start(script: str, *args) -> subprocess.Popen:
    """A Python process running `script` until it prints its first line (then it waits to be killed)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip(), "the helper process did not start"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def stale_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "earlier"}))
    return path


# ----------------------------------------------------------------------------------------------------------
# The lock itself

def test_a_second_holder_is_refused_until_the_first_releases(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(DistilleryError) as err:
        RunLock(tmp_path / "run").acquire()  # the same process counts: another thread, another node run
    assert err.value.field == "output.dir" and f"pid {os.getpid()}" in err.value.problem and err.value.fix
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_NAME).exists()


def test_a_live_process_holds_and_a_killed_one_is_taken_over(tmp_path):
    holder = start(HOLD, tmp_path / "run")
    try:
        with pytest.raises(DistilleryError, match=f"pid {holder.pid}"):
            RunLock(tmp_path / "run", "out").acquire()
    finally:
        kill(holder)  # SIGKILL: no cleanup ran, the lock file stays
    assert (tmp_path / "run" / LOCK_NAME).exists()
    lock = RunLock(tmp_path / "run").acquire()
    assert lock.took_over["pid"] == holder.pid
    lock.release()


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "pid-only"])
def test_stale_locks_of_dead_pids_are_taken_over_live_and_foreign_ones_not(tmp_path, monkeypatch, flock):
    if not flock:
        monkeypatch.setattr(runlock, "fcntl", None)  # as on a platform or filesystem without flock
    stale_lock(tmp_path / "dead", dead_pid())
    with RunLock(tmp_path / "dead") as lock:
        assert lock.took_over is not None
    stale_lock(tmp_path / "mine", os.getpid())  # our pid, but we do not hold it: a restarted container's ComfyUI
    with RunLock(tmp_path / "mine"):
        pass
    stale_lock(tmp_path / "elsewhere", dead_pid(), host="another-machine")
    with pytest.raises(DistilleryError, match="another-machine") as err:
        RunLock(tmp_path / "elsewhere").acquire()
    assert LOCK_NAME in err.value.fix  # what to delete if that run is really gone
    if not flock:
        with RunLock(tmp_path / "held"):
            with pytest.raises(DistilleryError):
                RunLock(tmp_path / "held").acquire()


# ----------------------------------------------------------------------------------------------------------
# Training

def test_second_training_run_is_refused_before_writing_and_lock_released_after_a_raise(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(DistilleryError) as err:
            from dit_distillery.trainer import train

            train(make_job(out, steps=2))
        assert err.value.field == "output.dir" and f"pid {os.getpid()}" in err.value.problem
        assert not (out / "job.json").exists()  # refused before anything was written

    class Boom(RuntimeError):
        pass

    def stop():
        raise Boom("a crash mid-run")

    with pytest.raises(Boom):
        train(make_job(out, steps=2), stop=stop)
    assert not (out / LOCK_NAME).exists()
    with pytest.raises(StopRequested):
        train(make_job(out, steps=2), stop=lambda: True)
    assert not (out / LOCK_NAME).exists()
    RunLock(out).acquire().release()


def test_training_removes_leftovers_of_killed_writes_and_keeps_the_rest(tmp_path):
    from dit_distillery.trainer import Callbacks, train

    out, pid = tmp_path / "run", dead_pid()
    ckpts = out / "checkpoints"
    (ckpts / ".checkpoint-0000004.abc_12xy").mkdir(parents=True)
    (ckpts / ".checkpoint-0000004.abc_12xy" / "trainable.safetensors").write_bytes(b"x" * 1000)
    leftovers = [out / f"run.safetensors.{pid}.k3j_9zqa.tmp", ckpts / "checkpoint-0000002" /
                 f"run.safetensors.{pid}.0a1b2c3d.tmp", out / "validation" / f"step-0000002.png.{pid}.zzzzzzzz.tmp"]
    kept = [out / "notes.tmp", out / f"run.safetensors.{pid}.short.tmp", out / "run.safetensors.k3j_9zqa.tmp",
            out / f"x.{pid}.k3j_9zqa.tmp.bak", ckpts / ".checkpoint-notes" / "keep.txt"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"y" * 100)

    messages = []

    class Log(Callbacks):
        def on_message(self, text):
            messages.append(text)

    with atomic_output(out / "live.json") as live:  # a write in progress (this process, held by flock)
        live.write_text("{}")
        train(make_job(out, steps=1), callbacks=Log())
        assert live.exists()
    assert not any(p.exists() for p in leftovers) and not (ckpts / ".checkpoint-0000004.abc_12xy").exists()
    assert all(p.exists() for p in kept)
    assert any("removed 4 leftover" in m and "MB" in m for m in messages), messages


# ----------------------------------------------------------------------------------------------------------
# gen-dataset and shrink

def test_gen_dataset_refuses_a_held_folder_and_cleans_its_leftovers(tmp_path):
    from dit_distillery import tiny
    from dit_distillery.gen_dataset import generate_distill_dataset

    pipe = tiny.tiny_pipeline("qwen_image", seed=0)
    out, pid = tmp_path / "ds", dead_pid()
    fast = dict(teacher_steps=1, teacher_cfg=2.0, height=32, width=32)
    with RunLock(out, "out"):
        with pytest.raises(DistilleryError) as err:
            generate_distill_dataset(pipe, ["a red circle"], out, **fast)
        assert err.value.field == "out" and f"pid {os.getpid()}" in err.value.problem
    assert not (out / "metadata.csv").exists()
    generate_distill_dataset(pipe, ["a red circle"], out, **fast)
    leftover = out / "images" / f"x.png.{pid}.abcdefgh.tmp"
    meta_leftover = out / f"metadata.csv.{pid}.abcdefgh.tmp"
    unrelated = out / "images" / "x.png.tmp"
    for path in (leftover, meta_leftover, unrelated):
        path.write_bytes(b"z" * 10)
    report = generate_distill_dataset(pipe, ["a red circle", "a blue square"], out, **fast)
    assert report["rows_written"] == 1
    assert not leftover.exists() and not meta_leftover.exists() and unrelated.exists()


def test_a_killed_shrink_leaves_a_temp_file_the_next_shrink_removes(tmp_path):
    from dit_distillery.models import qwen_image
    from dit_distillery.shrink import shrink
    from dit_distillery.shrink.synthetic import write_synthetic_source

    source = tmp_path / "src.safetensors"
    write_synthetic_source(source, qwen_image.tiny_config(num_layers=2), dtype=torch.float32)
    out = tmp_path / "student.safetensors"
    writer = start(WRITE, out)  # a real write, killed half-way: its temp file stays
    kill(writer)
    left = [p for p in tmp_path.iterdir() if p.name.startswith("student.safetensors.")]
    assert len(left) == 1 and left[0].name.startswith(f"student.safetensors.{writer.pid}.")
    other = tmp_path / f"other.safetensors.{writer.pid}.abcdefgh.tmp"  # another target's: not this shrink's
    other.write_bytes(b"o")
    with atomic_output(tmp_path / "student.safetensors") as live:  # a live writer of the same target: kept
        shrink(source, out, layers=1, strategy="first")
        assert live.exists()
    assert not left[0].exists() and other.exists() and out.is_file()


def test_leftover_check_by_pid_where_flock_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "fcntl", None)
    dead = tmp_path / f"a.bin.{dead_pid()}.abcdefgh.tmp"
    alive = tmp_path / f"a.bin.{os.getppid()}.abcdefgh.tmp"  # our parent runs: its write may be in progress
    for path in (dead, alive):
        path.write_bytes(b"1234")
    removed, freed = remove_leftovers(tmp_path, recursive=False, target="a.bin")
    assert removed == [dead] and freed == 4 and alive.exists()


@pytest.mark.slow
def test_ddp_ranks_all_stop_when_the_main_process_is_refused(tmp_path):
    """Two processes (torchrun, gloo): the main one is refused, the other learns it from the collective and
    exits too, instead of waiting forever at the next barrier."""
    job_path = make_job(tmp_path / "run", steps=2).save(tmp_path / "job.json")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with RunLock(tmp_path / "run"):
        started = time.time()
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              "29531", "-m", "dit_distillery", "train", str(job_path), "--json", "--quiet"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "output.dir" in out.stdout + out.stderr, out.stderr[-2000:]
    assert time.time() - started < 240 and not (tmp_path / "run" / "job.json").exists()
