"""What the commands leave behind: files with the usual permissions, and a word when a built-in pipeline is random."""

import json
import os
import stat

import pytest
import torch

from dit_distillery.cli import main
from dit_distillery.formats import atomic_write_text, give_usual_permissions, save_safetensors, usual_mode


@pytest.fixture
def umask():
    """Run under a chosen umask, restored afterwards."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_build_aaadit_outputs_get_the_usual_permissions(tmp_path, umask, capsys):
    out, single = tmp_path / "aaadit", tmp_path / "aaadit.safetensors"
    assert main(["build-aaadit", "--preset", "tiny", "--blocks", "1", "--out", str(out),
                 "--single-file", str(single), "--json"]) == 0
    assert mode(out) == 0o755 and mode(single) == 0o644
    assert sorted((p.name, mode(p)) for p in out.iterdir()) == [("config.json", 0o644),
                                                               ("diffusion_pytorch_model.safetensors", 0o644)]


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, file_mode, folder_mode):
    umask(mask)
    assert (usual_mode(), usual_mode(folder=True)) == (file_mode, folder_mode)
    save_safetensors({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
    atomic_write_text(tmp_path / "t.txt", "hello\n")
    assert mode(tmp_path / "w.safetensors") == mode(tmp_path / "t.txt") == file_mode
    # a private temporary tree (what mkdtemp and safetensors' save_file make) gets a plain tree's modes
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("x")
    for path, private in ((tree, 0o700), (tree / "sub", 0o700), (tree / "sub" / "f", 0o600)):
        os.chmod(path, private)
    give_usual_permissions(tree)
    assert (mode(tree), mode(tree / "sub"), mode(tree / "sub" / "f")) == (folder_mode, folder_mode, file_mode)


def test_training_checkpoints_get_the_usual_permissions(tmp_path, umask):
    from dit_distillery.trainer.state import save_checkpoint

    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(3)
    optimizer.step()
    folder = save_checkpoint(tmp_path / "run", 1, {"w": weight}, optimizer.state_dict(), {"loss": 1.0})
    assert mode(folder) == 0o755
    assert {p.name: mode(p) for p in folder.iterdir()} == {
        "trainable.safetensors": 0o644, "optimizer.safetensors": 0o644, "state.json": 0o644}


def test_sample_warns_that_the_default_pipeline_is_untrained(tmp_path, capsys):
    from dit_distillery.commands.sample import DEMO_TEACHER

    argv = ["sample", "--prompt", "a red circle on a blue background", "--steps", "1", "--json"]
    assert main([*argv, "--pipeline", "default", "--out", str(tmp_path / "a.png")]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert "random" in report["warning"] and DEMO_TEACHER in report["warning"]
    assert "demo --out demo_out" in report["warning"]
    assert f"warning: {report['warning']}" in captured.err

    # a trained (here: freshly built, but given) DiT replacing the default's: no warning
    dit = tmp_path / "demo.safetensors"
    assert main(["build-aaadit", "--preset", "demo", "--single-file", str(dit), "--json"]) == 0
    capsys.readouterr()
    assert main([*argv, "--pipeline", "default", "--dit", str(dit), "--out", str(tmp_path / "b.png")]) == 0
    captured = capsys.readouterr()
    assert "warning" not in json.loads(captured.out.strip().splitlines()[-1]) and "warning" not in captured.err


def test_gen_dataset_warns_that_its_teacher_is_untrained(tmp_path, capsys):
    """A teacher dataset drawn from a random DiT is noise: the same warning, before the rows are written."""
    assert main(["gen-dataset", "--pipeline", "default", "--synthetic-prompts", "1", "--teacher-steps", "1",
                 "--out", str(tmp_path / "d"), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert "random" in report["warning"] and f"warning: {report['warning']}" in captured.err


def test_the_warning_names_where_the_demo_writes_its_teacher(tmp_path, monkeypatch):
    """The demo's first training job is the teacher; its weights land at <out>/teacher/teacher.safetensors."""
    from pathlib import Path

    from dit_distillery import demo
    from dit_distillery.commands.sample import DEMO_TEACHER

    jobs = []

    class Stop(Exception):
        pass

    def first_job(job, **_):
        jobs.append(job)
        raise Stop()

    monkeypatch.setattr(demo, "train", first_job)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_out" / "data").mkdir(parents=True)
    (tmp_path / "demo_out" / "data" / "metadata.csv").write_text("")  # the demo's data stage is then skipped
    with pytest.raises(Stop):
        demo.run_demo("demo_out", demo.PRESETS["quick"], log=lambda _: None)
    job = jobs[0]
    assert job.output.name == "teacher"
    assert Path(job.output.dir) / f"{job.output.name}.safetensors" == Path(DEMO_TEACHER)
