"""The Runs screen (home of `widen tui`): fake run directories written by hand, driven by the pilot.

Navigation to screens other engineers build (monitor, compare, builder) is stubbed in ``RunsApp``:
these tests check that the Runs screen asks for the right screen with the right runs.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from textual.widgets import Footer

import widen_tui.tui.app
from engine.runs.rundir import RunDir
from widen_tui.index import RunIndex
from widen_tui.tui.app import WidenApp
from widen_tui.tui.screens.runs import RunsScreen
from widen_tui.tui.widgets.binding_commands import BindingCommands
from widen_tui.tui.widgets.confirm import ConfirmScreen
from widen_tui.tui.widgets.run_rows import fmt_age
from widen_tui.tui.widgets.runs_table import RunsTable

pytestmark = pytest.mark.anyio  # the async tests run on anyio's pytest plugin, with asyncio


@pytest.fixture
def anyio_backend():
    return "asyncio"


# A subclass defined here would look for app.tcss next to this file: name the app's own.
APP_CSS = str(Path(widen_tui.tui.app.__file__).parent / "app.tcss")
NOW = time.mktime(time.strptime("2024-03-01T12:00:00", "%Y-%m-%dT%H:%M:%S"))  # the frozen clock


def dead_pid() -> int:
    """A pid no process has: above the kernel's pid_max."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 2 ** 22 + 1


def make_run(root: Path, run_id: str, state: str = "done", *, name: str | None = None, variant: str | None = None,
             created: str = "2024-03-01T10:00:00", pid: int | None = None, stage: int | None = 1,
             step: int | None = 200, stages: int = 2, final_ppl: dict | None = None, share: float | None = None,
             error: str | None = None, plan: str = "/experiments/quickstart.toml", seed: int = 0) -> RunDir:
    """A run directory as the launcher and worker leave it, written by hand (no engine)."""
    run = RunDir(root / run_id)
    run.path.mkdir(parents=True)
    run.run_json.write_text(json.dumps({"id": run_id, "name": name or run_id, "variant": variant,
                                        "plan_path": plan, "created": created, "seed": seed}))
    # a live worker's heartbeat is fresh (an old one with a live pid is `stale`)
    status = {"state": state, "stage": stage, "step": step,
              "heartbeat": time.time() if state in ("queued", "running") else NOW}
    if pid is not None:
        status["pid"] = pid
    if error:
        status["error"] = error
    run.status_json.write_text(json.dumps(status))
    run.plan.write_text("name = 'q'\n" + "[[stages]]\ntask = 'prose'\nsteps = 200\n" * stages)
    if final_ppl is not None:
        run.results_json.write_text(json.dumps({"state": state, "summary": {"final_ppl": final_ppl,
                                                                            "trainable_share": share}}))
    return run


def four_runs(root: Path) -> None:
    """done (with results), failed, running (this process: alive), and lost (a dead pid)."""
    make_run(root, "20240301-100000-quickstart-aaaa", name="quickstart", created="2024-03-01T10:00:00",
             final_ppl={"prose": 14.344, "python": 13.84}, share=0.1287)
    make_run(root, "20240301-103000-compare-lora-bbbb", "failed", name="compare-lora", variant="lora",
             created="2024-03-01T10:30:00", stage=0, step=17, error="CUDA out of memory",
             plan="/experiments/compare_strategies.toml")
    make_run(root, "20240301-110000-compare-widen-cccc", "running", name="compare-widen", variant="widen",
             created="2024-03-01T11:00:00", pid=os.getpid(), stage=1, step=42,
             plan="/experiments/compare_strategies.toml")
    make_run(root, "20240301-113000-growth-dddd", "running", name="growth", created="2024-03-01T11:30:00",
             pid=dead_pid(), stage=0, step=5, plan="/experiments/progressive_growth.toml")


class RunsApp(WidenApp):
    """WidenApp with a frozen clock, and other screens' navigation recorded instead of opened."""

    CSS_PATH = APP_CSS

    def __init__(self, root: Path, clock=lambda: NOW):
        super().__init__(root)
        self.clock = clock
        self.opened: list[tuple[str, object]] = []
        self.notes: list[tuple[str, str]] = []

    def on_mount(self, event) -> None:
        event.prevent_default()  # instead of WidenApp.on_mount: the same screen, with our clock
        self.push_screen(RunsScreen(clock=self.clock))

    def open_monitor(self, run_id):
        self.opened.append(("monitor", run_id))

    def open_compare(self, run_ids):
        self.opened.append(("compare", list(run_ids)))

    def open_builder(self, plan=None):
        self.opened.append(("builder", plan))

    def notify(self, message, *, severity="information", **kwargs):
        self.notes.append((severity, str(message)))
        return super().notify(message, severity=severity, **kwargs)


async def wait_until(pilot, condition, timeout: float = 30.0) -> None:  # generous: CI shares 2 cores
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for the screen, which shows:\n{screen_text(pilot.app)}")
        await pilot.pause(0.02)


async def loaded(pilot) -> RunsScreen:
    """The Runs screen once its first read of the runs root is on the table (and the footer's keys
    are drawn: the footer fills itself in after the screen mounts)."""
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, RunsScreen) and pilot.app.screen.loaded
                     and pilot.app.screen.query_one(Footer).children)
    await pilot.pause()
    return pilot.app.screen


async def reloaded(pilot, screen: RunsScreen) -> None:
    """Read the runs root again now, and wait until the table shows it."""
    await wait_until(pilot, lambda: not screen._loading)  # a timer's read may have begun before a change
    screen.loaded = False
    screen.refresh_runs()
    await wait_until(pilot, lambda: screen.loaded)


def screen_text(app) -> str:
    """What the terminal shows, as plain text (as App.export_screenshot renders it)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, record=True,
                      legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def table_of(screen) -> RunsTable:
    return screen.query_one(RunsTable)


def cell(table: RunsTable, run_id: str, column: str) -> str:
    return str(table.get_cell(run_id, column))


def put_cursor_on(table: RunsTable, run_id: str) -> None:
    table.move_cursor(row=table.get_row_index(run_id), animate=False)


# ---------------------------------------------------------------------------------------------


async def test_lists_every_run_with_state_stage_metrics_and_age(tmp_path):
    four_runs(tmp_path)
    app = RunsApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        table = table_of(screen)
        assert table.shown_ids == sorted(p.name for p in tmp_path.iterdir() if p.is_dir())  # oldest first
        done, failed, running, lost = table.shown_ids
        assert [cell(table, i, "state") for i in table.shown_ids] == ["done", "failed", "running", "lost"]
        assert cell(table, done, "ppl") == "prose 14.34 python 13.84"
        assert cell(table, done, "share") == "12.9%"
        assert cell(table, done, "stage") == "2/2" and cell(table, running, "stage") == "2/2"
        assert cell(table, failed, "stage") == "1/2" and cell(table, failed, "step") == "17"
        assert cell(table, done, "age") == "2h00m" and cell(table, lost, "age") == "30m"
        assert cell(table, failed, "variant") == "lora" and cell(table, failed, "plan") == "compare_strategies"
        # the footer and every row have been painted (under load the first frames may lag the table)
        await wait_until(pilot, lambda: all(w in screen_text(app) for w in ("Quit", "running", "lost", "failed")))
        text = screen_text(app)  # at 80 columns the main columns and the footer's keys are on screen
        for word in ("state", "name", "stage", "ppl", "lost", "running", "quickstart", "Open", "Mark",
                     "Compare", "Cancel", "Resume", "Delete", "Sweep", "Quit"):
            assert word in text, word
        put_cursor_on(table, failed)
        await pilot.pause()
        assert "error: CUDA out of memory" in str(screen.query_one("#runs-detail").render())


async def test_seeds_of_one_variant_are_told_apart_by_their_seed(tmp_path):
    """Three seeds of one variant: names clipped alike ("progressive-growth-grow…"), seeds not."""
    for seed in (0, 1, 2):
        make_run(tmp_path, f"20240301-10000{seed}-pg-grow-{seed}", name=f"progressive-growth-grow-from-small-s{seed}",
                 variant="grow-from-small", plan="/experiments/progressive_growth.toml", seed=seed,
                 final_ppl={"python": 8.0 + seed})
    app = RunsApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        table = table_of(await loaded(pilot))
        assert len({cell(table, i, "name") for i in table.shown_ids}) == 1
        assert [cell(table, i, "seed") for i in table.shown_ids] == ["0", "1", "2"]
        assert [str(c.label) for c in table.ordered_columns][2:4] == ["name", "seed"]
    # `widen runs` has the column too
    from widen_tui.views.report import runs_table

    console = Console(width=120, file=io.StringIO(), record=True)
    console.print(runs_table(RunIndex(tmp_path).refresh()))
    lines = console.export_text().splitlines()
    assert [c.strip() for c in lines[1].split("┃")[1:-1]][:4] == ["id", "name", "seed", "state"]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    assert [row[2] for row in rows] == ["0", "1", "2"]


async def test_state_updates_in_place_and_a_dead_worker_shows_lost(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = make_run(tmp_path, "20240301-110000-live-aaaa", "running", pid=sleeper.pid, stage=0, step=3)
        app = RunsApp(tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await loaded(pilot)
            table = table_of(screen)
            assert cell(table, run.id, "state") == "running"
            with open(run.events, "a") as f:  # a running run's latest evals come from its events
                f.write(json.dumps({"type": "eval", "t": NOW, "stage": 0, "step": 3, "task": "prose",
                                    "loss": 3.0, "ppl": 20.0855, "bpb": 4.3}) + "\n")
            await reloaded(pilot, screen)
            assert cell(table, run.id, "ppl") == "prose 20.09"
            sleeper.kill()
            sleeper.wait()
            await reloaded(pilot, screen)
            assert cell(table, run.id, "state") == "lost"
            assert RunIndex(tmp_path).get(run.id)["state"] == "lost"
    finally:
        sleeper.kill()


async def test_filter_narrows_by_id_name_variant_plan_and_state(tmp_path):
    four_runs(tmp_path)
    app = RunsApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        table = table_of(screen)
        await pilot.press("slash")
        assert screen.focused.id == "runs-filter"
        await pilot.press(*"lora")
        assert [cell(table, i, "variant") for i in table.shown_ids] == ["lora"]
        for query, expected in (("lost", 1), ("compare_strategies", 2), ("cccc", 1), ("growth", 1),
                                ("compare running", 1), ("nothing-like-this", 0), ("", 4)):
            screen.query_one("#runs-filter").value = query
            await pilot.pause()
            assert len(table.shown_ids) == expected, query
        await pilot.press("escape")
        assert screen.focused is table


async def test_marking_two_runs_and_c_opens_compare_with_them(tmp_path):
    four_runs(tmp_path)
    app = RunsApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        table = table_of(screen)
        first, second, third, _ = table.shown_ids
        await pilot.press("space", "down", "space")  # mark the 1st, skip the 2nd, mark the 3rd
        assert table.marked == {first, third}
        assert cell(table, first, "mark") == "●" and cell(table, second, "mark") == " "
        assert "2 marked" in str(screen.query_one("#runs-detail").render())
        await pilot.press("c")
        assert app.opened == [("compare", [first, third])]
        await pilot.press("space")  # the cursor went on to the 4th; unmark the 1st by going back
        put_cursor_on(table, first)
        await pilot.press("space")
        put_cursor_on(table, third)
        await pilot.press("space")
        put_cursor_on(table, second)
        assert len(table.marked) == 1  # only the 4th is still marked
        table.unmark(list(table.marked))
        await pilot.press("c")  # nothing marked: the run under the cursor
        assert app.opened[-1] == ("compare", [second])


async def test_enter_opens_the_monitor_and_n_s_open_builder_and_sweep(tmp_path):
    four_runs(tmp_path)
    app = RunsApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        await pilot.press("down", "enter")
        assert app.opened == [("monitor", table_of(screen).shown_ids[1])]
        await pilot.press("n")
        assert app.opened[-1] == ("builder", None)
        await pilot.press("s")
        from widen_tui.tui.screens.sweep import SweepScreen

        assert isinstance(app.screen, SweepScreen)
        await pilot.press("escape")
        assert app.screen is screen


async def test_delete_asks_first_then_removes_the_directory_and_the_record(tmp_path):
    four_runs(tmp_path)
    app = RunsApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        table = table_of(screen)
        done = table.shown_ids[0]
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")  # keep it
        assert app.screen is screen and (tmp_path / done).is_dir()
        await pilot.press("d")
        await pilot.press("y")
        await wait_until(pilot, lambda: done not in table.shown_ids)
        assert not (tmp_path / done).exists() and RunIndex(tmp_path).get(done) is None
        assert any(severity == "information" and f"{done}: deleted" in text for severity, text in app.notes)


async def test_delete_refuses_a_running_run_without_asking(tmp_path):
    four_runs(tmp_path)
    app = RunsApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        table = table_of(screen)
        running = table.shown_ids[2]
        put_cursor_on(table, running)
        await pilot.press("d")
        assert app.screen is screen  # no question asked
        assert app.notes[-1][0] == "error" and "still running — cancel first (x)" in app.notes[-1][1]
        assert (tmp_path / running).is_dir()


async def test_cancel_asks_then_stops_the_worker(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = make_run(tmp_path, "20240301-110000-live-aaaa", "running", pid=sleeper.pid)
        make_run(tmp_path, "20240301-090000-old-bbbb")
        app = RunsApp(tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await loaded(pilot)
            table = table_of(screen)
            put_cursor_on(table, "20240301-090000-old-bbbb")
            await pilot.press("x")  # a done run: nothing to cancel, and no question
            assert app.screen is screen and "nothing to be cancelled" in app.notes[-1][1]
            put_cursor_on(table, run.id)
            await pilot.press("x")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("escape")
            assert sleeper.poll() is None and not run.cancel_request.exists()
            await pilot.press("x", "y")
            await wait_until(pilot, lambda: any("cancel requested" in text for _, text in app.notes))
            assert run.cancel_request.exists()
            assert sleeper.wait(timeout=10) != 0  # SIGTERM reached the worker
    finally:
        sleeper.kill()


async def test_resume_says_why_not_for_a_done_run(tmp_path):
    four_runs(tmp_path)
    app = RunsApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("u")
        severity, text = app.notes[-1]
        assert severity == "warning" and "is done: nothing to be resumed" in text
        await pilot.press("down", "u")  # a failed run without a checkpoint: the launcher says so
        await wait_until(pilot, lambda: "has no checkpoint" in app.notes[-1][1])
        assert app.notes[-1][0] == "error"


async def test_every_action_is_in_the_command_palette(tmp_path):
    four_runs(tmp_path)
    app = RunsApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        titles = {title: help_text for title, help_text, _ in BindingCommands(screen)._commands()}
        for title in ("Open", "Mark", "Filter", "Compare", "Cancel", "Resume", "Delete", "Plan", "Sweep"):
            assert title in titles, title
        assert titles["Compare"] == "key: c" and titles["Filter"] == "key: /"
        await pilot.press("ctrl+p")
        await pilot.press(*"compare")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.opened)
        assert app.opened == [("compare", [table_of(screen).shown_ids[0]])]


def test_ages_read_at_a_glance():
    assert [fmt_age(s) for s in (5, 125, 3 * 3600 + 300, 5 * 86400)] == ["5s", "2m", "3h05m", "5d"]


# ---------------------------------------------------------------------------------------------
# hundreds of runs stay quick

REFRESH_BOUND_S = 0.25  # a refresh with nothing changed, read + table, on 500 runs
FIRST_LOAD_BOUND_S = 5.0  # the first read (index built from 500 directories) and 500 rows added


async def test_500_runs_refresh_quickly_and_update_only_what_changed(tmp_path, capsys):
    states = ("done", "failed", "cancelled", "done")
    for i in range(500):
        make_run(tmp_path, f"20240301-{i:06d}-run-{i:04d}", states[i % 4], name=f"run-{i}",
                 variant=("lora", "widen", None)[i % 3], created=f"2024-02-{1 + i % 28:02d}T10:00:00",
                 final_ppl={"prose": 10 + i / 100, "python": 20 + i / 100} if i % 4 == 0 else None,
                 share=0.1 if i % 4 == 0 else None)
    live = make_run(tmp_path, "20240301-999999-live", "running", pid=os.getpid(), step=1)
    app = RunsApp(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        started = time.perf_counter()
        screen = await loaded(pilot)
        await pilot.pause()
        first = time.perf_counter() - started
        table = table_of(screen)
        assert table.row_count == 501

        rebuilds = []
        table.clear = lambda *a, **k: rebuilds.append(1) or RunsTable.clear(table, *a, **k)
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            await reloaded(pilot, screen)
            await pilot.pause()  # the table repainted
            timings.append(time.perf_counter() - started)
        steady = sorted(timings)[len(timings) // 2]

        status = json.loads(live.status_json.read_text())
        live.status_json.write_text(json.dumps({**status, "step": 2}))
        updates = []
        original = table.update_cell
        table.update_cell = lambda *a, **k: updates.append(a[:2]) or original(*a, **k)
        await reloaded(pilot, screen)
        assert updates == [(live.id, "step")] and not rebuilds
        assert cell(table, live.id, "step") == "2"
    with capsys.disabled():
        print(f"\n500 runs: first load+render {first:.3f}s; refresh+render with nothing changed: median "
              f"{steady * 1000:.1f} ms (read {screen.last_load_s * 1000:.1f} ms); bound {REFRESH_BOUND_S}s")
    assert first < FIRST_LOAD_BOUND_S
    assert steady < REFRESH_BOUND_S


# ---------------------------------------------------------------------------------------------
# snapshot


def test_runs_screen_snapshot(tmp_path, snap_compare):
    four_runs(tmp_path)
    app = RunsApp(tmp_path)

    async def settle(pilot):
        await loaded(pilot)
        table_of(pilot.app.screen).move_cursor(row=1, animate=False)  # the failed run: its error below
        await pilot.pause()
        # every row and the failed run's error painted (under load the first frames may lag the table)
        await wait_until(pilot, lambda: all(w in screen_text(pilot.app) for w in ("running", "lost",
                                                                                  "CUDA out of memory")))

    assert snap_compare(app, terminal_size=(80, 24), run_before=settle)
