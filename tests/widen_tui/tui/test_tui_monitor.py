"""The run monitor (widen_tui/tui/screens/monitor.py), its curve model (engine/runs/curves.py) and chart.

Real tiny runs (in-process, and detached through the CLI while the monitor watches), a run whose
worker died (`lost`), the follower reading only new bytes, and snapshots from a hand-written run
directory (fixed values and times, so the pictures never drift)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable, RichLog, Static, TabbedContent

from engine.plan import load_plan
from engine.runs import curves
from engine.runs import follow as follow_module
from engine.runs.records import ExpandEvent, StepEvent, parse_event
from engine.runs.rundir import RunDir, write_json_atomic
from engine.train.loop import Trainer
from tests.conftest import widen
from tests.widen_tui.views.test_plot import fake_events, fake_results
from widen_tui.launcher import create_run
from widen_tui.tui import app as app_module
from widen_tui.tui.app import WidenApp
from widen_tui.tui.screens.monitor import MonitorScreen
from widen_tui.tui.widgets.loss_chart import LossChart

SNAPSHOT_RUN = "20250101-000000-tiny-aaaa"


class MonitorApp(WidenApp):
    """The real app (its stylesheet, title and keys) opened straight on one run's monitor."""

    CSS_PATH = str(Path(app_module.__file__).with_name("app.tcss"))  # relative paths follow the subclass

    def __init__(self, root: Path, run_id: str, clock=time.time):
        super().__init__(root)
        self.run_id, self.clock = run_id, clock

    def on_mount(self, event) -> None:
        event.prevent_default()  # not WidenApp's on_mount: no Runs screen underneath
        self.push_screen(MonitorScreen(self.run_id, clock=self.clock))


async def wait_until(pilot, condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def cells(table: DataTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def headline(screen: MonitorScreen) -> str:
    return str(screen.query_one("#headline", Static).render())


# ---------------------------------------------------------------------------------------------
# curves: downsample and the incremental folder


def test_downsample_keeps_ends_and_extremes():
    rng = random.Random(0)
    points = [(float(i), rng.gauss(3.0, 0.1)) for i in range(10_000)]
    points[4321] = (4321.0, 9.0)    # a loss spike
    points[7777] = (7777.0, -2.0)   # and a dip
    out = curves.downsample(points, 200)
    assert len(out) <= 200
    assert out[0] == points[0] and out[-1] == points[-1]
    assert (4321.0, 9.0) in out and (7777.0, -2.0) in out
    assert [p[0] for p in out] == sorted(p[0] for p in out)  # still in x order, no duplicates
    assert len({p[0] for p in out}) == len(out)


def test_downsample_short_and_degenerate_inputs():
    points = [(0.0, 1.0), (1.0, 2.0), (2.0, 0.5)]
    assert curves.downsample(points, 10) == points
    assert curves.downsample(points, 3) == points
    assert curves.downsample([], 5) == []
    assert curves.downsample(points, 0) == []
    assert curves.downsample([(float(i), float(i)) for i in range(100)], 2) == [(0.0, 0.0), (99.0, 99.0)]


def test_folder_fed_in_pieces_matches_the_batch_fold():
    events = fake_events(growth_at=7)
    batch = curves.curves_from_events("r", events)
    folder = curves.CurveFolder("r")
    versions = []
    for i in range(0, len(events), 7):
        folder.add(events[i:i + 7])
        versions.append(folder.version)
    live = folder.curves()
    assert live.steps == batch.steps and live.evals == batch.evals and live.growths == batch.growths
    assert live.expansions == batch.expansions and live.stage_names == batch.stage_names
    assert versions == sorted(versions) and versions[-1] > 0
    folder.add([parse_event({"type": "system", "t": 1.0, "rss_mb": 1, "cpu_percent": 0.0, "gpus": [],
                             "gpu_status": None, "torch_peak_mb": None})])
    assert folder.version == versions[-1]  # a system sample moves no curve: no redraw
    marks = live.expansion_marks("flops")
    assert [m.kind for m in marks] == ["expansion", "growth"]
    assert [m.label for m in live.stage_marks()] == ["prose", "widen+python"]


# ---------------------------------------------------------------------------------------------
# a real tiny run, finished


@pytest.fixture
def finished_run(tiny_plan, widen_home) -> RunDir:
    run = create_run(load_plan(tiny_plan), tiny_plan, widen_home)
    Trainer(run.path).run_plan()
    assert run.status()["state"] == "done"
    return run


def test_monitor_shows_a_finished_real_run(finished_run, widen_home):
    async def main():
        app = MonitorApp(widen_home, finished_run.id)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = app.screen
            assert isinstance(screen, MonitorScreen)
            await wait_until(pilot, lambda: screen.loaded and screen.live.results is not None, what="results")
            await pilot.pause(0.2)
            chart = screen.query_one("#chart", LossChart)
            assert chart.point_count >= 12  # 12 training steps and the evaluations
            assert "done" in headline(screen)

            forgetting = cells(screen.query_one("#forgetting-table", DataTable))
            assert [row[0] for row in forgetting] == ["prose", "python"]
            columns = [str(c.label) for c in screen.query_one("#forgetting-table", DataTable).columns.values()]
            assert columns == ["task", "initial", "after 1:prose", "after 2:python", "forgetting (bits/byte)"]
            assert all(v != "–" for row in forgetting for v in row[1:4])  # every cell filled
            assert forgetting[1][-1] == "–"  # python was only trained last: no forgetting yet
            prose_f = finished_run.results()["forgetting"]["bpb"]["prose"]["absolute"]
            assert forgetting[0][-1] == f"{prose_f:+.4f}"
            note = str(screen.query_one("#continual", Static).render())
            assert "results.json" in note

            expansions = cells(screen.query_one("#expansion-table", DataTable))
            assert len(expansions) == 1 and expansions[0][1] == "widen_ffn" and expansions[0][2] == "16,448"
            assert "stage start" in expansions[0][-1]

            await pilot.press("5")  # the log tab: a RichLog writes once it has a size
            await pilot.pause(0.2)
            log = screen.query_one("#event-log", RichLog)
            text = "\n".join(line.text for line in log.lines)
            assert "expand widen_ffn" in text and "status done" in text

            # axes: tokens and FLOPs redraw the chart, steps comes back
            await pilot.press("t")
            await pilot.pause(0.1)
            assert chart.x_axis == "tokens" and chart.note == ""
            await pilot.press("f")
            await pilot.pause(0.1)
            assert chart.x_axis == "flops"
            await pilot.press("s")
            await pilot.pause(0.1)
            assert chart.x_axis == "steps"
            # cancel is offered only to a running run
            assert screen.check_action("cancel_run", ()) is None

            # small and resized: still lays out, the chart keeps a usable size
            await pilot.resize_terminal(80, 24)
            await pilot.pause(0.2)
            assert chart.size.height >= 8 and chart.size.width >= 70
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert not isinstance(app.screen, MonitorScreen)

    asyncio.run(main())


def test_widen_tui_run_opens_the_monitor_over_the_runs_list(finished_run, widen_home):
    pytest.importorskip("widen_tui.tui.screens.runs")

    async def main():
        app = WidenApp(widen_home, run=finished_run.id)
        async with app.run_test(size=(100, 32)) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.loaded,
                             what="the monitor")
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert type(app.screen).__name__ == "RunsScreen"

    asyncio.run(main())


def test_png_figures_from_the_monitor(finished_run, widen_home):
    async def main():
        app = MonitorApp(widen_home, finished_run.id)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = app.screen
            await wait_until(pilot, lambda: screen.loaded, what="history")
            await pilot.press("p")
            figures = finished_run.path / "figures"
            await wait_until(pilot, lambda: (figures / "loss.png").exists()
                             and (figures / f"forgetting-{finished_run.id}.png").exists(), timeout=60,
                             what="PNG figures")
            await wait_until(pilot, lambda: not [w for w in app.workers if w.group == "figures" and w.is_running],
                             what="the figures worker")

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# live: a detached run watched while it runs; only new bytes are read


class CountingReader(follow_module.EventReader):
    """EventReader that records every read: where it started and how many bytes it took."""

    reads: list[tuple[int, int]] = []

    def read_new(self):
        start = self.offset
        events = super().read_new()
        CountingReader.reads.append((start, self.offset - start))
        return events


@pytest.mark.slow
def test_monitor_follows_a_live_run_to_done(tiny_plan, widen_home, monkeypatch):
    async def main():
        CountingReader.reads = []
        monkeypatch.setattr(follow_module, "EventReader", CountingReader)
        out = widen("run", str(tiny_plan), "--detach", "--set", "stages.0.steps=40", "--set", "stages.1.steps=40",
                    "--set", "train.eval_interval=20", env_home=widen_home, check=True)
        run = RunDir(widen_home / out.stdout.strip())

        app = MonitorApp(widen_home, run.id)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = app.screen
            await wait_until(pilot, lambda: screen.loaded, what="the first read")
            seen: list[tuple[str, int]] = []

            def progress() -> bool:
                seen.append((screen.live.state, len(screen.live.curves.curves().steps)))
                return screen.live.state in ("done", "failed", "lost")

            await wait_until(pilot, progress, timeout=150, what="the run to end")
            assert screen.live.state == "done", run.stderr.read_text()[-1500:]
            await wait_until(pilot, lambda: screen.live.results is not None, what="results.json")
            await pilot.pause(0.6)

            states = [s for s, _ in seen]
            assert states[0] in ("queued", "running")  # opened while it ran
            counts = [n for _, n in seen]
            assert counts[-1] == 80
            assert len({n for n in counts if 0 < n < 80}) >= 2, "steps should arrive while the monitor watches"
            assert "done" in headline(screen)
            assert screen.query_one("#chart", LossChart).point_count >= 80
            assert len(cells(screen.query_one("#forgetting-table", DataTable))) == 2
            assert screen.redraws < 4 * len(seen)  # redraws are throttled, not one per event

        # every byte of events.jsonl read exactly once: each read starts where the last one ended
        reads = CountingReader.reads
        assert reads[0][0] == 0
        assert all(start == prev_start + prev_len for (prev_start, prev_len), (start, _) in zip(reads, reads[1:]))
        assert sum(n for _, n in reads) == run.events.stat().st_size
        assert len(reads) > 3

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# a run whose worker died


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_run(root: Path, run_id: str, events: list[dict], state: str = "done", pid: int | None = None,
              results: dict | None = None, name: str = "tiny") -> RunDir:
    """A run directory written by hand: events with their own fixed times."""
    run = RunDir(root / run_id)
    write_json_atomic(run.run_json, {"id": run_id, "name": name, "seed": 0, "plan_path": None,
                                     "created": "2025-01-01T00:00:00", "created_ts": 1000.0})
    run.events.write_text("".join(json.dumps(e.to_json()) + "\n" for e in events))
    # a live worker's heartbeat is fresh (an old one with a live pid is `stale`)
    beat = time.time() if pid and state in ("queued", "running") else 1000.0 + len(events)
    write_json_atomic(run.status_json, {"state": state, "pid": pid, "host": socket.gethostname(),
                                        "heartbeat": beat})
    if results is not None:
        write_json_atomic(run.results_json, results)
    return run


def test_a_dead_worker_shows_as_lost(widen_home):
    async def main():
        events = fake_events()
        cut = next(i for i, e in enumerate(events) if isinstance(e, StepEvent) and e.stage == 1 and e.step == 5)
        run = write_run(widen_home, "20250101-000000-dead-dddd", events[:cut], state="running", pid=dead_pid())
        app = MonitorApp(widen_home, run.id)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = app.screen
            await wait_until(pilot, lambda: screen.loaded, what="history")
            await pilot.pause(0.1)
            assert screen.live.state == "lost"
            assert "lost" in headline(screen) and "widen resume" in headline(screen)
            assert screen.check_action("cancel_run", ()) is None
            # the forgetting table has the rows of the stages that ended before it died
            assert len(screen.live.forgetting().rows) == 2

    asyncio.run(main())


def test_cancel_asks_first_then_stops_the_worker(widen_home, monkeypatch):
    """`c` on a running run: the question, `n` keeps it, `y` asks the worker to stop (cancel.request
    and SIGTERM, as `widen cancel` does). A sleeping process stands in for the worker."""
    CountingReader.reads = []
    monkeypatch.setattr(follow_module, "EventReader", CountingReader)
    worker = subprocess.Popen(["sleep", "60"])
    try:
        events = fake_events()
        cut = next(i for i, e in enumerate(events) if isinstance(e, StepEvent) and e.stage == 1)
        run = write_run(widen_home, "20250101-000000-busy-bbbb", events[:cut], state="running", pid=worker.pid)

        async def main():
            app = MonitorApp(widen_home, run.id)
            async with app.run_test(size=(100, 32)) as pilot:
                screen = app.screen
                await wait_until(pilot, lambda: screen.loaded, what="history")
                assert screen.live.state == "running" and screen.check_action("cancel_run", ()) is True
                await pilot.press("c")
                await pilot.pause(0.1)
                assert type(app.screen).__name__ == "ConfirmScreen"
                await pilot.press("n")
                await pilot.pause(0.1)
                assert app.screen is screen and not run.cancel_request.exists()
                await pilot.press("c")
                await pilot.pause(0.1)
                await pilot.press("y")
                await wait_until(pilot, lambda: worker.poll() is not None, what="the worker to get SIGTERM")
                assert run.cancel_request.exists()
                # woken to look at once, the follower then sleeps again: no busy polling
                reads = len(CountingReader.reads)
                await pilot.pause(1.0)
                assert len(CountingReader.reads) - reads <= 3

        asyncio.run(main())
    finally:
        worker.kill()
        worker.wait()


# ---------------------------------------------------------------------------------------------
# progress: loading, tokenizing and long evaluations show what the worker is busy with


def test_the_activity_line_words(widen_home):
    from rich.console import Console

    from engine.runs.progress import RunProgress
    from widen_tui.views.activity import activity_line
    from widen_tui.views.event_text import describe_event
    from widen_tui.views.report import live_view

    def said(phase, what, done=0, total=None):
        return describe_event(parse_event({"type": "progress", "t": 1.0, "phase": phase, "what": what, "done": done,
                                           "total": total}))

    assert said("load", "model") == "loading model…"
    assert said("tokenize", "python", 1, 3) == "tokenizing python (2/3)"
    assert said("evaluate", "prose", 5, 8) == "evaluating prose 5/8 batches"
    assert said("generate", "qa") == "generating qa examples…"
    assert said("compile", "model") == "compile model…"  # a newer engine's phase: as written

    p = RunProgress()
    p.update(parse_event({"type": "progress", "t": 100.0, "phase": "load", "what": "model", "done": 0}))
    assert activity_line(p, now=142.5) == "loading model… · 42s"
    assert activity_line(p, now=100.0 + 185) == "loading model… · 3m05s"
    assert activity_line(p, now=142.5, state="lost") is None  # its worker is gone: it is not loading
    console = Console(width=120, record=True)  # `widen watch`
    console.print(live_view(p))
    assert "loading model… · " in console.export_text()


def test_monitor_shows_what_a_busy_worker_does_until_the_result_comes(widen_home):
    """A run whose events end in `progress` (an evaluation half done): the summary says so, with
    how long it has lasted; the eval result that follows hides the line."""
    worker = subprocess.Popen(["sleep", "60"])
    try:
        events = fake_events()
        cut = next(i for i, e in enumerate(events) if isinstance(e, StepEvent) and e.stage == 1 and e.step == 5)
        last = events[cut - 1].t
        busy = [parse_event({"type": "progress", "t": last + 1 + dt, "phase": "evaluate", "what": "prose",
                             "done": done, "total": 8}) for dt, done in ((0, 0), (30, 4), (40, 5))]
        run = write_run(widen_home, "20250101-000000-busy-eeee", events[:cut] + busy, state="running",
                        pid=worker.pid)

        async def main():
            app = MonitorApp(widen_home, run.id, clock=lambda: last + 1 + 42)
            async with app.run_test(size=(100, 32)) as pilot:
                screen = app.screen
                await wait_until(pilot, lambda: screen.loaded, what="history")
                await pilot.pause(0.1)
                activity = screen.query_one("#activity", Static)
                assert activity.display and activity.region.height == 1
                assert str(activity.render()) == "▸ evaluating prose 5/8 batches · 42s"
                await pilot.press("5")
                await pilot.pause(0.2)
                log = "\n".join(line.text for line in screen.query_one("#event-log", RichLog).lines)
                assert "evaluating" not in log  # the summary shows it: no log line per report

                result = {"type": "eval", "t": last + 50, "stage": 1, "step": 5, "task": "prose", "loss": 4.0,
                          "ppl": 54.6, "bpb": 5.8}
                with open(run.events, "a") as f:
                    f.write(json.dumps(result) + "\n")
                await wait_until(pilot, lambda: not activity.display, what="the line to go")

        asyncio.run(main())
    finally:
        worker.kill()
        worker.wait()


# ---------------------------------------------------------------------------------------------
# snapshots: a hand-written run, fixed numbers and times


def snapshot_events() -> list:
    # the engine counts growths from 0
    events = [e.model_copy(update={"growth": 0}) if isinstance(e, ExpandEvent) and e.trigger else e
              for e in fake_events(growth_at=9)]
    gpu = {"type": "system", "t": 1030.0, "rss_mb": 2210.4, "cpu_percent": 98.5, "torch_peak_mb": 5120.0,
           "gpu_status": "1 GPU(s) via NVML",
           "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "mem_used_mb": 20480.0, "mem_total_mb": 81559.0,
                     "util_percent": 87}]}
    return events[:-1] + [parse_event(gpu), events[-1]]


def snapshot_app(root: Path) -> MonitorApp:
    events = snapshot_events()
    write_run(root, SNAPSHOT_RUN, events, results=fake_results(events))
    return MonitorApp(root, SNAPSHOT_RUN, clock=lambda: 2000.0)


async def settle(pilot) -> None:
    screen = pilot.app.screen
    await wait_until(pilot, lambda: isinstance(screen, MonitorScreen) and screen.loaded
                     and screen.live.results is not None, what="history and results")
    await pilot.pause(0.3)


def test_snapshot_monitor_loss(snap_compare, tmp_path):
    assert snap_compare(snapshot_app(tmp_path / "runs"), terminal_size=(110, 34), run_before=settle)


def test_snapshot_monitor_forgetting_80x24(snap_compare, tmp_path):
    async def forgetting_tab(pilot):
        await settle(pilot)
        await pilot.press("2")
        await pilot.pause(0.2)

    assert snap_compare(snapshot_app(tmp_path / "runs"), terminal_size=(80, 24), run_before=forgetting_tab)


def test_snapshot_monitor_system_with_a_gpu(snap_compare, tmp_path):
    async def system_tab(pilot):
        await settle(pilot)
        await pilot.press("4")
        await pilot.pause(0.2)
        assert pilot.app.screen.query_one("#tabs", TabbedContent).active == "system"

    assert snap_compare(snapshot_app(tmp_path / "runs"), terminal_size=(100, 28), run_before=system_tab)
