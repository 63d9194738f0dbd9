"""One bad file breaks only its own run, and only as far as that file goes.

One finished tiny run is made once (in-process); each case copies its runs root, damages one file
of one run (truncated, garbage bytes, the wrong JSON shape, invalid UTF-8, deleted; bad lines in
the middle of events.jsonl) and runs the CLI on it: every command ends with exit 0 or one clear
line (never a traceback, never a catch-all "error: KeyError"), says which file is bad, and a
healthy run in the same root is unaffected.

Also here: the files widen writes are strict JSON (NaN -> null) with the umask's mode, and every
reader folds only the latest segment of a resumed run's events.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.errors import WidenError
from engine.runs.rundir import RunDir, write_json_atomic

REPO = Path(__file__).resolve().parents[3]

PLAN = textwrap.dedent("""
    name = "tiny"
    seed = 0

    [model]
    source = "builtin:tiny-neo"

    [tasks.prose]
    source = "builtin:pydoc"

    [train]
    batch_size = 2
    seq_len = 16
    eval_batches = 1
    eval_interval = 0
    device = "cpu"

    [[stages]]
    task = "prose"
    steps = 3
""")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, str, str]:
    """(runs root, the run to damage, a healthy twin): one finished run, trained once, and a copy."""
    import engine.train.session
    from engine.plan import load_plan
    from widen_tui.index import RunIndex
    from widen_tui.launcher import create_run

    base = tmp_path_factory.mktemp("made")
    plan_path = base / "tiny.toml"
    plan_path.write_text(PLAN)
    root = base / "runs"
    victim = create_run(load_plan(plan_path), plan_path, root, name="victim")
    assert engine.train.session.run(victim.path) == 0
    victim.stderr.write_text("the worker's output\n")
    healthy = RunDir(root / (victim.id[:-4] + "beef"))
    shutil.copytree(victim.path, healthy.path)
    info = json.loads(healthy.run_json.read_text())
    write_json_atomic(healthy.run_json, {**info, "id": healthy.id, "name": "healthy",
                                         "created": info["created"][:-2] + "59"})
    RunIndex(root).rebuild()
    return root, victim.id, healthy.id


def copy_root(made, tmp_path) -> tuple[Path, RunDir, RunDir]:
    root, victim, healthy = made
    copy = tmp_path / "runs"
    shutil.copytree(root, copy)
    return copy, RunDir(copy / victim), RunDir(copy / healthy)


# -- damage ------------------------------------------------------------------------------------------

GARBAGE = bytes(range(256)) * 3
BAD_EVENT_LINES = [b"[1, 2, 3]", b'"a string"', b'{"type": "step", "t": 1.0}',          # not objects, no keys
                   b'{"type": "eval", "t": 1, "stage": "0", "step": 1, "task": 5, "loss": "x", "ppl": 1, "bpb": 1}',
                   b'{"type": "step", "t": 1, "stage": 0, "step": 1, "global_step": 1, "loss": "\xff\xfe", '
                   b'"lr": 1, "tokens_per_s": 1, "tokens": 1, "flops": 1}',                   # bad UTF-8
                   b"{torn", b'{"type": 7, "t": 0}', b'{"no": "type"}']


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(GARBAGE)
    elif how == "a list":
        path.write_bytes(b"[1, 2, 3]\n")
    elif how == "a string":
        path.write_bytes(b'"just a string"\n')
    elif how == "invalid utf-8":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + b"\xff\xfe\xc3" + data[middle:])
    elif how == "bad lines":  # events.jsonl: bad lines in the middle, the good ones around them
        lines = data.split(b"\n")
        middle = len(lines) // 2
        path.write_bytes(b"\n".join(lines[:middle] + BAD_EVENT_LINES + lines[middle:]))
    else:
        raise AssertionError(how)


MODES = ["truncated", "empty", "garbage", "a list", "a string", "invalid utf-8", "deleted"]
FILES = ["run.json", "status.json", "results.json", "events.jsonl", "plan.toml", "stderr.log",
         "checkpoints/latest/model.safetensors", "checkpoints/latest/trainer.json",
         "checkpoints/latest/state.safetensors"]
CASES = [(f, m) for f in FILES for m in MODES] + [("events.jsonl", "bad lines")]


# -- the CLI, in-process -----------------------------------------------------------------------------


class _NoWaiting:
    """Stands in for the CLI's `time`: a command on a finished run never needs to wait."""

    time = staticmethod(__import__("time").time)

    @staticmethod
    def sleep(seconds):
        raise AssertionError("the command waits for a run that has ended (it would never return)")


@pytest.fixture(autouse=True)
def _commands_never_wait(monkeypatch):
    import widen_tui.cli.follow as follow  # the verbs that wait: watch, logs --follow

    monkeypatch.setattr(follow, "time", _NoWaiting)


def widen(root: Path, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `widen ARGS`, as `widen_tui.cli.main` would end: a
    WidenError is its one line `error: ...`; anything else escaping is a bug (re-raised)."""
    from widen_tui.cli import app

    result = CliRunner().invoke(app, list(args), env={"WIDEN_HOME": str(root), "COLUMNS": "200"})
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        if not isinstance(result.exception, WidenError):
            raise result.exception
        stderr += f"error: {result.exception}\n"
    return result.exit_code, result.stdout, stderr


def assert_clear(code: int, out: str, err: str, what: str) -> None:
    """Exit 0, or one clear line; no traceback, no bare exception class names."""
    text = out + err
    assert "Traceback" not in text, f"{what}: {text[-2000:]}"
    # main()'s catch-all for a bug reads `error: KeyError: ... (WIDEN_DEBUG=1 shows the traceback)`
    assert not re.search(r"^error: \w+(Error|Exception):", err, re.M) and "WIDEN_DEBUG" not in err, \
        f"{what}: a catch-all error line: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    if code != 0:
        assert code == 1 and len(lines) == 1, f"{what}: exit {code} with {err!r}"
        assert lines[0].startswith("error: "), f"{what}: {err!r}"
    else:
        assert len(lines) <= 1, f"{what}: too much on stderr: {err!r}"
        assert all(line.startswith(("warning:", "error: ", "run ")) for line in lines), f"{what}: {err!r}"


def strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("file,how", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_one_bad_file_breaks_only_its_own_run(made, tmp_path, file, how):
    root, victim, healthy = copy_root(made, tmp_path)
    damage(victim.path / file, how)
    v, h = victim.id, healthy.id

    code, out, err = widen(root, "runs")
    assert_clear(code, out, err, "runs")
    assert code == 0 and h in out
    if file != "run.json":  # a run dir without a readable run.json is still listed, by its id
        assert v in out

    code, out, err = widen(root, "runs", "--json")
    assert code == 0, err
    records = {r["id"]: r for r in strict_loads(out)}
    assert records[h]["state"] == "done"
    if file in ("status.json", "results.json"):  # the other file still says how it ended
        assert records[v]["state"] == "done"

    for args in (["show", v], ["show", v, "--json"], ["logs", v], ["logs", v, "--raw"], ["watch", v],
                 ["compare", v, h], ["compare", v, h, "--json"], ["db", "rebuild"]):
        code, out, err = widen(root, *args)
        assert_clear(code, out, err, " ".join(args))
        if "--json" in args and code == 0:
            strict_loads(out)
        if args[:1] == ["show"] and file in ("run.json", "status.json", "results.json") \
                and how not in ("deleted", "truncated" if file == "run.json" else "") and code == 0:
            assert f"{file} unreadable" in err, f"{' '.join(args)} does not name the bad file: {err!r}"
        if args[0] in ("logs", "watch") and file == "events.jsonl" and how not in ("deleted", "empty"):
            assert "events.jsonl" in err, f"{' '.join(args)} does not name the bad file: {err!r}"

    # the healthy run is unaffected
    code, out, err = widen(root, "show", h)
    assert code == 0 and not err.strip() and "perplexity per task" in out, err
    code, out, err = widen(root, "logs", h)
    assert code == 0 and not err.strip() and "status done" in out


def test_bad_event_lines_are_skipped_with_their_line_numbers(made, tmp_path):
    from engine.runs.events import EventReader, read_all

    root, victim, _ = copy_root(made, tmp_path)
    good = read_all(victim.events)
    first = len(victim.events.read_bytes().split(b"\n")) // 2 + 1  # where damage() puts the bad lines
    damage(victim.events, "bad lines")
    reader = EventReader(victim.events)
    events = reader.read_new()
    assert events == good  # every good line still read, every bad one dropped
    assert len(reader.problems) == len(BAD_EVENT_LINES)
    assert reader.problems[0] == f"events.jsonl line {first}: not an object but a list"
    assert any("not UTF-8" in p for p in reader.problems)
    assert any("eval event: stage is a string, not an integer" in p for p in reader.problems)
    code, out, err = widen(root, "logs", victim.id)
    assert code == 0 and f"line {first}: not an object but a list" in err and len(err.splitlines()) == 1


EXPORT_CASES = [("checkpoints/latest/model.safetensors", "truncated"), ("checkpoints/latest/model.safetensors", "deleted"),
                ("checkpoints/latest/trainer.json", "garbage"), ("checkpoints/latest/trainer.json", "a list"),
                ("checkpoints/latest/state.safetensors", "garbage"), ("plan.toml", "invalid utf-8"),
                ("plan.toml", "truncated"), ("status.json", "garbage")]


@pytest.mark.parametrize("file,how", EXPORT_CASES, ids=[f"{f}-{m}" for f, m in EXPORT_CASES])
def test_export_of_a_damaged_run_ends_in_one_clear_line(made, tmp_path, file, how):
    root, victim, _ = copy_root(made, tmp_path)
    damage(victim.path / file, how)
    code, out, err = widen(root, "export", victim.id, str(tmp_path / "out"))
    assert_clear(code, out, err, "export")


def test_export_of_the_healthy_run_works(made, tmp_path):
    root, _, healthy = copy_root(made, tmp_path)
    code, out, err = widen(root, "export", healthy.id, str(tmp_path / "out"))
    assert code == 0, err
    assert "parity" in out


@pytest.mark.parametrize("file,how,args", [
    ("status.json", "invalid utf-8", ["runs"]),
    ("results.json", "a list", ["show"]),
    ("events.jsonl", "bad lines", ["logs"]),
])
def test_real_cli_in_a_subprocess(made, tmp_path, file, how, args):
    root, victim, healthy = copy_root(made, tmp_path)
    damage(victim.path / file, how)
    env = {**os.environ, "WIDEN_HOME": str(root), "PYTHONPATH": str(REPO)}

    def real_widen(*argv: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "widen_tui.cli", *argv], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=60)
        assert_clear(proc.returncode, proc.stdout, proc.stderr, " ".join(argv))
        assert proc.returncode == 0, proc.stderr
        return proc

    proc = real_widen(*args, *([] if args == ["runs"] else [victim.id]))
    assert victim.id in proc.stderr and file in proc.stderr  # it says which run and which file
    proc = real_widen("show", healthy.id)
    assert not proc.stderr.strip() and "perplexity per task" in proc.stdout


# -- strict JSON, written with the umask's mode ------------------------------------------------------


def test_json_writers_write_strict_json(tmp_path):
    import numpy as np

    from engine.runs.events import EventWriter, read_all
    from engine.runs.rundir import dumps_json, read_json

    record = {"loss": float("nan"), "ppl": float("inf"), "nested": [{"x": float("-inf")}, (1.5, float("nan"))],
              "np": np.float32("nan"), "ok": 2.5}
    write_json_atomic(tmp_path / "r.json", record)
    parsed = strict_loads((tmp_path / "r.json").read_text())
    assert parsed == {"loss": None, "ppl": None, "nested": [{"x": None}, [1.5, None]], "np": None, "ok": 2.5}
    assert strict_loads(dumps_json(record)) == parsed

    writer = EventWriter(tmp_path / "events.jsonl")
    writer.emit("step", stage=0, step=1, global_step=1, loss=float("nan"), lr=1e-3, tokens_per_s=1.0,
                tokens=32, flops=np.float64("inf"))
    writer.close()
    line = (tmp_path / "events.jsonl").read_text().splitlines()[0]
    assert strict_loads(line)["loss"] is None and strict_loads(line)["flops"] is None
    assert read_all(tmp_path / "events.jsonl")[0].loss is None  # null is a valid (missing) metric

    # readers accept the NaN literals of older files
    (tmp_path / "old.json").write_text('{"state": "done", "summary": {"final_ppl": {"prose": NaN}}}')
    assert math.isnan(read_json(tmp_path / "old.json")["summary"]["final_ppl"]["prose"])


def test_cli_json_output_is_strict_for_old_files_with_nan(made, tmp_path):
    root, victim, healthy = copy_root(made, tmp_path)
    results = victim.results_json.read_text()
    data = json.loads(results)
    data["summary"]["final_ppl"] = {task: float("nan") for task in data["summary"]["final_ppl"]}
    data["summary"]["acc"] = float("inf")
    victim.results_json.write_text(json.dumps(data))  # the NaN literals an older worker wrote
    for args in (["runs", "--json"], ["show", victim.id, "--json"], ["compare", victim.id, healthy.id, "--json"]):
        code, out, err = widen(root, *args)
        assert code == 0, err
        strict_loads(out)
    code, out, err = widen(root, "runs")
    assert code == 0 and victim.id in out


@pytest.mark.parametrize("umask", [0o002, 0o022])
def test_files_and_dirs_follow_the_umask(tmp_path, umask):
    from engine.runs.events import EventWriter
    from engine.runs.rundir import make_dir_shared, mkdtemp_shared
    from widen_tui.index import RunIndex

    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
        made_dir = mkdtemp_shared(prefix="cache-", dir=tmp_path)
        assert made_dir.stat().st_mode & 0o777 == 0o777 & ~umask
        import tempfile

        plain = Path(tempfile.mkdtemp(dir=tmp_path))
        assert plain.stat().st_mode & 0o777 == 0o700
        assert make_dir_shared(plain).stat().st_mode & 0o777 == 0o777 & ~umask
        index = RunIndex(tmp_path / "runs")
        index.upsert({"id": "r", "state": "done"})
        assert index.path.stat().st_mode & 0o777 == 0o666 & ~umask
        assert index.lock_path.stat().st_mode & 0o777 == 0o666 & ~umask
        EventWriter(tmp_path / "e.jsonl").close()
        assert (tmp_path / "e.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(old)


# -- resume segments ---------------------------------------------------------------------------------


def _step(stage, step, g, loss, t):
    return {"type": "step", "t": t, "stage": stage, "step": step, "global_step": g, "loss": loss, "lr": 1e-3,
            "tokens_per_s": 100.0, "tokens": 32 * g, "flops": 1e6 * g}


def _eval(stage, step, g, loss, t, task="prose"):
    return {"type": "eval", "t": t, "stage": stage, "step": step, "global_step": g, "task": task, "loss": loss,
            "ppl": math.exp(loss), "bpb": loss / 2, "tokens": 32 * g, "flops": 1e6 * g}


def _stage(stage, phase, t, steps=4):
    return {"type": "stage", "t": t, "stage": stage, "name": f"{stage + 1}:prose", "task": "prose", "steps": steps,
            "phase": phase, "global_step": stage * steps}


def _start(t, resumed=False):
    return {"type": "start", "t": t, "run": "r", "plan": "tiny", "seed": 0, "device": "cpu", "pid": 1,
            "params": 100, "stages": 2, "resumed": resumed, "stage_steps": [4, 4]}


def rewound_events() -> list:
    """Two stages of 4 steps. The first process gets to stage 2 step 3 (its checkpoint: stage 1's
    end), is cancelled; the resumed one continues from stage 2 step 0 — stage 2's steps again."""
    first = [_start(0), _eval(-1, 0, 0, 5.0, 1), _stage(0, "begin", 1)]
    first += [_step(0, k, k, round(5.0 - 0.1 * k, 3), 1 + k) for k in range(1, 5)]
    first += [_eval(0, 4, 4, 4.5, 6), _stage(0, "end", 6), _stage(1, "begin", 7),
              {"type": "expand", "t": 7, "stage": 1, "op": "widen_ffn", "params_before": 100, "params_after": 120,
               "params_added": 20, "trainable": 20, "exact": True, "max_abs_logit_delta": 0.0, "loss_before": 4.5,
               "loss_after": 4.5}]
    first += [_step(1, k, 4 + k, 9.0, 8 + k) for k in range(1, 4)]            # voided: loss 9
    first += [_eval(1, 2, 6, 9.0, 10), {"type": "checkpoint", "t": 12, "stage": 1, "step": 3, "path": "x",
                                         "reason": "cancel"},
              {"type": "status", "t": 12, "state": "cancelled"}]
    second = [_start(20, resumed=True),
              {"type": "resume", "t": 20, "stage": 1, "step": 0, "global_step": 4, "from_checkpoint": True},
              _stage(1, "begin", 21),
              {"type": "expand", "t": 21, "stage": 1, "op": "widen_ffn", "params_before": 100, "params_after": 120,
               "params_added": 20, "trainable": 20, "exact": True, "max_abs_logit_delta": 0.0, "loss_before": 4.5,
               "loss_after": 4.4}]
    second += [_step(1, k, 4 + k, round(4.4 - 0.1 * k, 3), 21 + k) for k in range(1, 3)]  # still going: steps 5, 6
    return records(first + second)


def records(events: list[dict]) -> list:
    """The typed records of hand-written events (each one checked as the reader checks a line)."""
    from engine.runs.records import parse_event

    return [parse_event(e) for e in events]


def test_latest_segment_drops_what_a_resume_voided():
    from engine.runs.events import latest_segment

    events = rewound_events()
    kept = latest_segment(events)
    steps = [(e.global_step, e.loss) for e in kept if e.type == "step"]
    assert steps == [(1, 4.9), (2, 4.8), (3, 4.7), (4, 4.6), (5, 4.3), (6, 4.2)]
    assert [e.loss_after for e in kept if e.type == "expand"] == [4.4]  # the operators once, re-applied
    assert not any(e.type == "status" for e in kept)
    assert [(e.stage, e.step) for e in kept if e.type == "eval"] == [(-1, 0), (0, 4)]
    assert latest_segment(kept) == kept  # idempotent


def test_every_reader_shows_each_step_once_after_a_resume():
    from engine.runs.compare import compare_runs
    from engine.runs.compare_data import LoadedRun
    from engine.runs.curves import CurveFolder, curves_from_events, matrix_from_events
    from engine.runs.progress import RunProgress
    from widen_tui.views.lineage import train_steps
    from widen_tui.views.live_run import LiveRun

    events = rewound_events()
    want = [(1, 4.9), (2, 4.8), (3, 4.7), (4, 4.6), (5, 4.3), (6, 4.2)]

    curves = curves_from_events("r", events)
    assert [(e.global_step, e.loss) for e in curves.steps] == want
    assert [y for _, y in curves.train_series()[1]] == [4.3, 4.2]
    assert len(curves.expansions) == 1 and curves.expansions[0].loss_after == 4.4
    assert [(p.event.stage, p.event.step) for p in curves.evals] == [(-1, 0), (0, 4)]

    folder = CurveFolder("r")  # live: one event at a time, the resume arriving mid-stream
    for e in events:
        folder.add([e])
    assert [(e.global_step, e.loss) for e in folder.curves().steps] == want

    progress = RunProgress()
    for e in events:
        progress.update(e)
    assert progress.train_curve == want
    assert progress.state == "running" and progress.stage == 1 and progress.step == 2
    assert [e.loss_after for e in progress.expansions] == [4.4]
    assert progress.eval_curves == {"prose": [(0, math.exp(5.0)), (4, math.exp(4.5))]}

    live = LiveRun("r")
    live.fold(events, {"state": "running"})
    assert [(e.global_step, e.loss) for e in live.curves.curves().steps] == want
    assert live.forgetting().rows == ["initial", "after 1:prose"]

    assert matrix_from_events(events)["rows"] == ["initial", "after 1:prose"]
    assert [(e.global_step, e.loss) for e in train_steps(events)] == want
    run = LoadedRun("r", {"id": "r", "name": "r"}, {"state": "running"}, None, events)
    assert [(e.global_step, e.loss) for e in run.events if e.type == "step"] == want

    data = compare_runs([({"id": "r", "name": "r"}, {"state": "running"}, None),
                         ({"id": "s", "name": "s"}, {"state": "running"}, None)], [events, events[:8]])
    # equal compute: the smallest budget is run s's 4 steps; r's loss there comes from its own curve
    assert data["runs"][0]["loss_at_equal_flops"] == pytest.approx(4.6)


def test_a_resume_without_a_checkpoint_starts_over():
    from engine.runs.events import latest_segment

    restart = [_start(30, resumed=True),
               {"type": "resume", "t": 30, "stage": 0, "step": 0, "global_step": 0, "from_checkpoint": False},
               _eval(-1, 0, 0, 5.0, 31), _stage(0, "begin", 31), _step(0, 1, 1, 4.0, 32)]
    events = rewound_events()[:12] + records(restart)
    kept = latest_segment(events)
    assert [(e.global_step, e.loss) for e in kept if e.type == "step"] == [(1, 4.0)]
    assert len([e for e in kept if e.type == "eval"]) == 1
