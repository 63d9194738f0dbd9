"""A mixture of experts' routing, shown: the `experts` event (engine.runs.records.ExpertsEvent) read
back and folded (engine.runs.progress), the view-model (widen_tui.views.experts), `widen show`'s table
and --json, `widen logs`' line, and the run monitor's Experts tab (a Textual pilot). Hand-written
run directories: no engine, no torch."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from rich.console import Console
from textual.widgets import DataTable, Static, TabbedContent
from typer.testing import CliRunner

from engine.runs.progress import RunProgress
from engine.runs.records import EventError, ExpertsEvent, StepEvent, parse_event
from tests.widen_tui.tui.test_tui_monitor import MonitorApp, wait_until, write_run
from tests.widen_tui.views.test_plot import fake_events
from widen_tui.tui.widgets.experts_heat import ExpertsHeat
from widen_tui.views.event_text import describe_event
from widen_tui.views.experts import experts_table, experts_view

LAYERS = (0, 1, 2)
EXPERTS = 8


def window(stage: int, step: int, g: int, t: float, dead_layer: int = 1) -> dict:
    """An experts event: layer `dead_layer` never routes to expert 6; expert 0 takes most tokens."""
    layers = []
    for layer in LAYERS:
        counts = [40.0] + [11.0] * (EXPERTS - 1)
        if layer == dead_layer:
            counts[6] = 0.0
        total = sum(counts)
        layers.append({"layer": layer, "load": [c / total for c in counts],
                       "dead": [e for e, c in enumerate(counts) if c == 0], "entropy": 1.9 - 0.1 * layer,
                       "tokens": 640})
    return {"type": "experts", "t": t, "stage": stage, "step": step, "global_step": g, "steps": 5, "top_k": 2,
            "aux_loss": 2.0412, "aux_coef": 0.001, "layers": layers}


def moe_events() -> list:
    """fake_events' two-stage run as a mixture of experts writes it: each step with its total loss,
    an experts event every 5 steps."""
    out = []
    for e in fake_events():
        if isinstance(e, StepEvent):
            out.append(parse_event({**e.to_json(), "total_loss": e.loss + 0.002}))
            if e.step % 5 == 0:
                out.append(parse_event(window(e.stage, e.step, int(e.global_step), e.t + 0.5)))
        else:
            out.append(e)
    return out


# ---------------------------------------------------------------------------------------------
# the record, the fold, the view


def test_experts_events_read_back_and_old_step_events_still_read():
    event = parse_event(window(0, 5, 5, 1.0))
    assert isinstance(event, ExpertsEvent) and event.to_json() == window(0, 5, 5, 1.0)
    assert event.layers[1].dead == [6] and event.z_loss is None
    old = {"type": "step", "t": 1.0, "stage": 0, "step": 1, "global_step": 1, "loss": 2.5, "lr": 1e-3,
           "tokens_per_s": 10.0, "tokens": 64, "flops": 1e9}
    assert parse_event(old).total_loss is None and "total_loss" not in parse_event(old).to_json()
    assert parse_event({**old, "total_loss": 2.51}).total_loss == 2.51


@pytest.mark.parametrize("change, message", [
    ({"layers": []}, "experts event: layers is empty"),
    ({"steps": "5"}, "experts event: steps is a string, not an integer"),
    ({"layers": [{"layer": 0, "load": [0.5, 0.5], "dead": [2]}]}, "dead expert 2 is not one of the layer's 2 experts"),
    ({"layers": [{"layer": 0, "load": [1.0]}, {"layer": 0, "load": [1.0]}]}, "layers[1].layer 0 is repeated"),
    ({"layers": [{"layer": 0, "load": []}]}, "layers[0].load is empty"),
])
def test_a_bad_experts_event_is_one_line(change, message):
    with pytest.raises(EventError) as error:
        parse_event({**window(0, 5, 5, 1.0), **change})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_fold_keeps_the_latest_window_and_a_resume_voids_it():
    progress = RunProgress()
    for e in moe_events():
        progress.update(e)
    assert (progress.experts.stage, progress.experts.step) == (1, 20)
    progress.update(parse_event({"type": "resume", "t": 5000.0, "stage": 1, "step": 10, "global_step": 30}))
    assert progress.experts is None  # logged past the resume point: the resumed steps write the next
    progress.update(parse_event(window(1, 15, 35, 5001.0)))
    assert progress.experts.step == 15


def test_the_view_and_the_show_table():
    view = experts_view(parse_event(window(1, 10, 30, 1.0)))
    assert [r.layer for r in view.rows] == list(LAYERS) and view.experts == EXPERTS and view.dead == 1
    row = view.rows[1]
    assert row.dead == (6,) and row.max_entropy == pytest.approx(math.log(EXPERTS))
    strip = row.strip().plain
    assert len(strip) == EXPERTS and strip[6] == "✕" and strip[0] == "█" and set(strip[1:6]) == {"▅"}
    assert row.spread() == "0.0%–37.7%" and row.entropy_text() == f"1.800 ({100 * 1.8 / math.log(8):.0f}%)"
    console = Console(width=140, record=True)
    console.print(experts_table(view))
    text = console.export_text()
    assert "routing at stage 2 step 10, over the last 5 steps · top 2 of 8 experts" in text
    assert "load-balancing loss 2.041 (weight 0.001)" in text and "1 dead" in text
    assert "█▅▅▅▅▅✕▅" in text and "none" in text  # layer 1's dead expert; the others have none


def test_the_log_lines():
    said = describe_event(parse_event(window(0, 5, 5, 1.0)))
    assert said == "stage 1 step 5: experts over 5 steps: load-balancing loss 2.0412, 1 dead, router entropy " \
                   "1.700–1.900 nats in 3 sparse layers"
    step = next(e for e in moe_events() if isinstance(e, StepEvent))
    assert f"(total with the routers' losses {step.total_loss:.4f})" in describe_event(step)


# ---------------------------------------------------------------------------------------------
# widen show


def test_widen_show_has_the_last_window_and_json_carries_it(widen_home):
    from widen_tui.cli import app

    events = moe_events()
    run = write_run(widen_home, "20250101-000000-moe-aaaa", events)
    dense = write_run(widen_home, "20250101-000001-dense-bbbb", fake_events())
    env = {"WIDEN_HOME": str(widen_home), "COLUMNS": "140"}
    result = CliRunner().invoke(app, ["show", run.id], env=env)
    assert result.exit_code == 0, result.output
    assert "routing at stage 2 step 20" in result.stdout and "█▅▅▅▅▅✕▅" in result.stdout
    shown = json.loads(CliRunner().invoke(app, ["show", run.id, "--json"], env=env).stdout)
    assert shown["experts"] == events[max(i for i, e in enumerate(events) if e.type == "experts")].to_json()
    result = CliRunner().invoke(app, ["show", dense.id], env=env)
    assert result.exit_code == 0 and "routing" not in result.stdout
    assert json.loads(CliRunner().invoke(app, ["show", dense.id, "--json"], env=env).stdout)["experts"] is None


# ---------------------------------------------------------------------------------------------
# the monitor's Experts tab


def test_the_monitor_shows_an_experts_tab_for_a_mixture_of_experts_only(widen_home):
    run = write_run(widen_home, "20250101-000000-moe-cccc", moe_events())
    dense = write_run(widen_home, "20250101-000000-dense-dddd", fake_events())

    async def main():
        app = MonitorApp(widen_home, run.id)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = app.screen
            await wait_until(pilot, lambda: screen.loaded, what="history")
            await pilot.pause(0.1)
            tabs = screen.query_one("#tabs", TabbedContent)
            assert screen.has_experts and tabs.get_tab("experts").display
            await pilot.press("6")
            await pilot.pause(0.2)
            assert tabs.active == "experts"
            heat = screen.query_one(ExpertsHeat)
            assert "routing at stage 2 step 20" in str(heat.query_one("#experts-caption", Static).render())
            table = heat.query_one(DataTable)
            assert table.row_count == len(LAYERS)
            strips = [str(table.get_row_at(i)[1]) for i in range(table.row_count)]
            assert strips[1] == "█▅▅▅▅▅✕▅" and "✕" not in strips[0]
            table.focus()
            await pilot.press("down")  # highlight layer 1: its shares as numbers
            await pilot.pause(0.1)
            detail = str(heat.query_one("#experts-detail", Static).render())
            assert detail.startswith("layer 1 · 640 tokens · e0 37.7% e1 10.4%") and "e6 0.0%" in detail
            log = [line for line in screen.live.fold([], None) if "experts" in line]
            assert log == []  # the tab shows the windows: no log line each

        app = MonitorApp(widen_home, dense.id)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = app.screen
            await wait_until(pilot, lambda: screen.loaded, what="history")
            await pilot.pause(0.1)
            tabs = screen.query_one("#tabs", TabbedContent)
            assert not screen.has_experts and not tabs.get_tab("experts").display
            assert screen.check_action("tab", ("experts",)) is None

    asyncio.run(main())


def test_the_tab_appears_when_the_first_window_arrives(widen_home):
    """A live run: the tab shows up with the first experts event the follower reads."""
    events = moe_events()
    first = next(i for i, e in enumerate(events) if e.type == "experts")
    run = write_run(widen_home, "20250101-000000-moe-eeee", events[:first])

    async def main():
        app = MonitorApp(widen_home, run.id)
        async with app.run_test(size=(100, 32)) as pilot:
            screen = app.screen
            await wait_until(pilot, lambda: screen.loaded, what="history")
            assert not screen.has_experts
            with open(run.events, "a") as f:
                f.write(json.dumps(events[first].to_json()) + "\n")
            await wait_until(pilot, lambda: screen.has_experts, what="the Experts tab")
            assert screen.query_one("#tabs", TabbedContent).get_tab("experts").display
            assert screen.query_one(ExpertsHeat).view.step == 5

    asyncio.run(main())
