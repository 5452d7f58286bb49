"""Progress: a steady ETA (synthetic timings), per-stage lines and bars, the trainer's step info and the demo's
stage counter (its heavy stages faked, so this takes a second). The teacher dataset's per-batch progress is
checked in test_gen_dataset.py."""

import io
import os
import random
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest

from dit_distillery import demo, progress
from dit_distillery.progress import Eta, Stages, format_seconds


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run(step_seconds, total):
    """(step, estimate, true seconds left) after each step of a loop whose steps take `step_seconds`."""
    clock = FakeClock()
    eta = Eta(total, clock=clock)
    out = []
    for step, seconds in enumerate(step_seconds, 1):
        clock.now += seconds
        out.append((step, eta.update(step), sum(step_seconds[step:])))
    return out


def test_eta_leaves_out_the_warm_up_step():
    # a 40 s first step (allocation, caches) then steady 1 s steps: exact from the second step on
    for step, estimate, truth in _run([40.0] + [1.0] * 99, 100)[1:]:
        assert estimate == pytest.approx(truth), step


def test_eta_does_not_swing_with_noise_and_checkpoints():
    rng = random.Random(0)
    total = 200
    # noisy steps, a slow first one and a 15 s checkpoint every 50 steps (a 20-step window swung 5x on these)
    times = [40.0] + [rng.uniform(0.5, 1.5) + (15.0 if s % 50 == 25 else 0.0) for s in range(2, total + 1)]
    points = [(s, e, t) for s, e, t in _run(times, total) if s >= total // 10 and s < total]
    for step, estimate, truth in points:
        assert 0.6 < estimate / truth < 1.5, (step, estimate, truth)
    # step-to-step change of the estimated pace: the first checkpoint seen raises it by its share of the run
    # so far (1.6x, once); after that, checkpoints and noise move it by under 20% (a 20-step window: 1.7x, 0.6x)
    swings = [(b[0], b[1] / (a[1] * (total - b[0]) / (total - a[0]))) for a, b in zip(points, points[1:])]
    assert all(1 / 1.7 < x < 1.7 for _, x in swings)
    assert all(1 / 1.2 < x < 1.2 for s, x in swings if s > 50), swings


def test_eta_of_a_resumed_loop_counts_from_where_it_resumed():
    clock = FakeClock()
    eta = Eta(100, done=60, clock=clock)
    clock.now = 5.0
    assert eta.update(61) == pytest.approx(5.0 * 39)  # only the first step's time is known yet
    clock.now = 7.0
    assert eta.update(62) == pytest.approx(2.0 * 38) and eta.seconds_per_unit == pytest.approx(2.0)
    assert format_seconds(eta.remaining()) == "1m16s" and format_seconds(None) == "?"


def test_plain_lines_every_tenth_and_every_minute():
    clock, lines = FakeClock(), []
    stages = Stages(["first", "second"], log=lines.append, clock=clock)
    stages.start("first")
    stages.update(0, 100, unit="row")
    for done in range(1, 101):
        clock.now += 1.0
        stages.update(done, 100, unit="row", loss="0.5")
    assert lines[0] == "stage 1/2: first"
    assert [line.split(" · ")[0] for line in lines[1:]] == [f"[stage 1/2: first] row {d}/100 ({d}%)"
                                                            for d in range(10, 101, 10)]
    assert "eta 1m30s" in lines[1] and "loss 0.5" in lines[1] and "eta" not in lines[-1]
    stages.message("hello")
    stages.start("second")  # a slow stage: a line at least every minute, even under 10%
    stages.update(0, 1000)
    for done in range(1, 4):
        clock.now += 61.0
        stages.update(done, 1000)
    assert lines[11:] == ["hello", "stage 2/2: second"] + [
        f"[stage 2/2: second] step {d}/1000 ({d / 1000:.0%}) · eta {format_seconds(61.0 * (1000 - d))}"
        for d in (1, 2, 3)]


class _Terminal(io.StringIO):
    def isatty(self):
        return True

    def fileno(self):
        return 99


def test_bars_on_a_terminal_only(monkeypatch):
    width = [100]
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: os.terminal_size((width[0], 40)))
    tty = _Terminal()
    stages = Stages(["teacher"], bars=True, file=tty, log=lambda text: pytest.fail("a terminal gets no lines"))
    stages.start("teacher")
    for step in range(1, 6):
        stages.update(step, 5, loss=f"{step / 10:.4f}")
    stages.message("checkpoint written")
    stages.close()
    text = tty.getvalue()
    assert "stage 1/1: teacher" in text and "5/5" in text and "loss=0.5000" in text
    assert "\rcheckpoint written\n" in text  # the bar cleared, the message on a line of its own, the bar redrawn
    piped, lines = io.StringIO(), []  # not a terminal: plain lines through `log`, nothing on the stream
    stages = Stages(["teacher"], bars=True, file=piped, log=lines.append)
    stages.start("teacher")
    for step in range(1, 6):
        stages.update(step, 5)
    assert piped.getvalue() == "" and lines[0] == "stage 1/1: teacher" and lines[-1].startswith(
        "[stage 1/1: teacher] step 5/5 (100%)")
    width[0] = 0  # a terminal without a width (some pseudo-terminals): tqdm would draw nothing there
    assert not Stages(["x"], bars=True, file=_Terminal()).bars


def test_trainer_step_info_uses_the_steady_eta(tmp_path, monkeypatch):
    from dit_distillery.trainer import Callbacks, loop, train
    from tests.trainer_helpers import make_job

    times = iter([0.0, 30.0, 31.0, 32.0, 33.0, 34.0])  # Eta's clock: at the start, then after each step
    monkeypatch.setattr(loop, "Eta", partial(Eta, clock=lambda: next(times)))

    class Record(Callbacks):
        infos = []

        def on_step(self, info):
            self.infos.append((info.step, info.eta_s, info.images_per_s))

    train(make_job(tmp_path, steps=5, batch_size=2), callbacks=Record())
    # the first step (30 s: warm-up) is all there is to go on; then the 1 s steps alone
    assert Record.infos[0] == (1, pytest.approx(4 * 30.0), pytest.approx(2 / 30.0))
    assert Record.infos[1:] == [(s, pytest.approx(5.0 - s), pytest.approx(2.0)) for s in range(2, 6)]


def test_demo_announces_every_stage_in_order(tmp_path, monkeypatch):
    """run_demo's stages with their work faked: the counter, each stage's progress under its own label."""
    cfg = demo.QUICK
    lines = []

    def fake_train(job, callbacks, stop=None):
        callbacks.on_message("training")
        for step in range(1, job.steps + 1):
            callbacks.on_step(SimpleNamespace(step=step, total=job.steps, loss=0.1, lr=1e-3, images_per_s=2.0,
                                              eta_s=1.0, epoch=0))
        return SimpleNamespace(weights=Path(job.output.dir) / "w.safetensors", chart=None)

    def fake_generate(pipeline, prompts, out, progress=None, **_):
        total = len(prompts) * _["seeds_per_prompt"]
        for done in range(0, total + 1, 4):
            progress(done, total)
        return {"rows_written": total, "rows_skipped": 0}

    import dit_distillery.data.synthetic as synthetic
    import dit_distillery.gen_dataset as gen
    import dit_distillery.models.registry as registry
    import dit_distillery.pipelines.loading as loading
    import dit_distillery.shrink.blocks as blocks

    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setattr(demo, "evaluate", lambda *a, **k: {})
    monkeypatch.setattr(synthetic, "write_dataset", lambda *a, **k: None)
    monkeypatch.setattr(gen, "generate_distill_dataset", fake_generate)
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: SimpleNamespace(dit=None))
    monkeypatch.setattr(blocks, "drop_blocks", lambda *a, **k: (None, []))
    monkeypatch.setattr(registry, "save_dit", lambda *a, **k: None)
    demo.run_demo(tmp_path, cfg, log=lines.append)
    names = demo.stage_names(cfg)
    announced = [line for line in lines if line.startswith("stage ")]
    assert announced == [f"stage {k}/6: {name}" for k, name in enumerate(names, 1)]
    # each stage's progress ends at 100% under its own label, between its announcement and the next
    for k, name in enumerate(names, 1):
        start = lines.index(f"stage {k}/6: {name}")
        end = lines.index(f"stage {k + 1}/6: {names[k]}") if k < 6 else len(lines)
        mine = [line for line in lines[start + 1:end] if line.startswith(f"[stage {k}/6: {name}]")]
        if name in ("teacher", "teacher dataset", "LoRA student", f"{cfg.shrunk_layers}-block student"):
            assert mine and "(100%)" in mine[-1], (name, lines[start:end])
        else:
            assert not mine
    assert "[teacher] training" in lines
