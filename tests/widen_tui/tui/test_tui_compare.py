"""The Compare screen: overlaid curves with a switchable x axis, the comparison table, and the
growth lineage (shared base → variants → plateau growths) with curves joined at branch points.

Real tiny runs (a variant group sharing a cached prefix, and a plain run) for the main flow;
hand-written run directories (events in the engine's shapes) for growths and the snapshot."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from engine.runs.compare_data import comparison, load_runs
from engine.runs.events import EventWriter
from engine.runs.records import EventRecord, ExpandEvent, StepEvent, parse_event
from engine.runs.rundir import RunDir, write_json_atomic
from widen_tui.tui.app import WidenApp
from widen_tui.tui.widgets.comparison_table import comparison_sections
from widen_tui.views.lineage import build_lineage, charted_nodes, lineage_curves

# -- hand-written runs ---------------------------------------------------------------------------


def growth_events(*, stages: tuple[tuple[str, int], ...] = (("python", 40),), growths_at: tuple[int, ...] = (),
                  params: int = 100_000, added: int = 20_000, batch_tokens: int = 256, offset: float = 0.0,
                  cached_stages: int = 0, trigger: str = "plateau") -> list[EventRecord]:
    """A run's events as engine/train/loop.py writes them: `stages` (name, steps), all on "python";
    step events carry params, tokens and FLOPs; a growth at each global step of `growths_at` adds
    `added` parameters (an expand event with `trigger`, "plateau" unless said); the events of the
    first `cached_stages` stages carry "cached": true (copied from a shared prefix)."""
    events: list[EventRecord] = []
    t = [1000.0]

    def emit(kind, **fields):
        t[0] += 1.0
        events.append(parse_event({"type": kind, "t": t[0], **fields}))

    tokens, flops, model, g = 0, 0.0, params, 0
    emit("start", run="r", plan="p", seed=0, device="cpu", pid=1, params=params, stages=len(stages), resumed=False)
    for stage, (name, steps) in enumerate(stages):
        cached = {"cached": True} if stage < cached_stages else {}
        emit("stage", stage=stage, name=name, task="python", steps=steps, phase="begin", global_step=g,
             tokens=tokens, flops=flops, **cached)
        for step in range(1, steps + 1):
            g += 1
            tokens += batch_tokens
            flops += 6.0 * batch_tokens * model
            loss = round(2.0 + 3.0 * math.exp(-g / 10) + offset, 6)
            emit("step", stage=stage, step=step, global_step=g, loss=loss, lr=1e-3, tokens_per_s=5000.0,
                 tokens=tokens, flops=flops, params=model, **cached)
            if g in growths_at:
                emit("expand", stage=stage, op="widen_ffn", params_before=model, params_after=model + added,
                     params_added=added, trainable=model + added, exact=True, max_abs_logit_delta=0.0,
                     loss_before=loss, loss_after=loss, trigger=trigger, growth=growths_at.index(g), step=step,
                     global_step=g, tokens=tokens, flops=flops, **cached)
                model += added
        emit("eval", stage=stage, step=steps, task="python", loss=2.1 + offset, ppl=math.exp(2.1 + offset),
             bpb=(2.1 + offset) / math.log(2), tokens=tokens, flops=flops, global_step=g, **cached)
        emit("stage", stage=stage, name=name, task="python", steps=steps, phase="end", params=model,
             trainable=model, **cached)
    emit("status", state="done")
    return events


def fake_results(events: list[EventRecord], *, ppl: float, wall_s: float = 10.0) -> dict:
    steps = [e for e in events if isinstance(e, StepEvent)]
    growths = [e for e in events if isinstance(e, ExpandEvent) and e.trigger]
    return {"tasks": ["python"], "summary": {
        "final_ppl": {"python": ppl}, "final_bpb": {"python": math.log(ppl) / math.log(2)},
        "forgetting": {"python": None}, "acc": math.log(ppl) / math.log(2), "bwt": None, "fwt": None,
        "params": steps[-1].params, "params_added": sum(e.params_added for e in growths),
        "trainable": steps[-1].params, "trainable_share": 1.0, "growths": len(growths),
        "tokens": steps[-1].tokens, "flops": steps[-1].flops, "wall_s": wall_s,
        "tokens_per_s": steps[-1].tokens / wall_s, "peak_rss_mb": 512.0, "torch_peak_mb": None}}


def write_run(root: Path, run_id: str, events: list[EventRecord], *, name: str, results: dict | None = None,
              **info) -> RunDir:
    """A run directory as the launcher and the worker leave it (fixed ids and times: snapshots)."""
    run = RunDir(root / run_id)
    write_json_atomic(run.run_json, {"id": run_id, "name": name, "plan_name": info.pop("plan_name", name),
                                     "seed": info.pop("seed", 0), "created": "2025-01-01T00:00:00",
                                     "created_ts": 1735689600.0, **info})
    writer = EventWriter(run.events)
    for event in events:
        writer.write_raw(event)
    writer.close()
    write_json_atomic(run.status_json, {"state": "done", "pid": 0, "heartbeat": 1735689600.0})
    if results is not None:
        write_json_atomic(run.results_json, results)
    return run


def growth_pair(root: Path, trigger: str = "plateau") -> list[str]:
    """A model grown twice (on plateaus unless `trigger` says) (100k → 120k → 140k params) and one
    trained at its final size from the start: the progressive_growth experiment in miniature."""
    grown = growth_events(growths_at=(12, 24), trigger=trigger)
    fixed = growth_events(params=140_000, offset=-0.05)
    write_run(root, "20250101-000000-grow-from-small-a1b2", grown, name="pg-grow-from-small",
              plan_name="progressive-growth", variant="grow-from-small", group="20250101-000000-pg-g001",
              prefix_stages=0, results=fake_results(grown, ppl=8.4))
    write_run(root, "20250101-000000-final-size-c3d4", fixed, name="pg-final-size", plan_name="progressive-growth",
              variant="final-size", group="20250101-000000-pg-g001", prefix_stages=0,
              results=fake_results(fixed, ppl=8.0))
    return ["20250101-000000-grow-from-small-a1b2", "20250101-000000-final-size-c3d4"]


# -- driving the app -----------------------------------------------------------------------------


def with_compare(root: Path, run_ids: list[str], check, size=(80, 24)) -> None:
    """Open Compare for `run_ids` in a WidenApp on `root`, wait for its data, run `check(pilot)`."""

    async def main():
        app = WidenApp(root)
        async with app.run_test(size=size) as pilot:
            app.open_compare(run_ids)
            await wait_for_data(pilot)
            await check(pilot)

    asyncio.run(main())


async def wait_for_data(pilot) -> None:
    from widen_tui.tui.screens.compare import CompareScreen

    for _ in range(200):
        await pilot.pause(0.02)
        screen = pilot.app.screen
        if isinstance(screen, CompareScreen) and screen.data is not None:
            break
    else:
        raise AssertionError("the Compare screen never got its data")
    await pilot.pause()


def tree_labels(screen) -> list[str]:
    from textual.widgets import Tree

    tree = screen.query_one("#lineage-tree", Tree)
    labels, stack = [], list(reversed(tree.root.children))
    while stack:
        node = stack.pop()
        labels.append(str(node.label).removeprefix("⠤⠤ "))  # the swatch: the node's colour in the chart
        stack += list(reversed(node.children))
    return labels


def screen_text(app) -> str:
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


# -- real runs -----------------------------------------------------------------------------------


@pytest.fixture
def real_runs(tiny_plan, widen_home, tmp_path) -> list[str]:
    """A variant group (lora, ffn) whose second run starts from the cached shared stage, and a
    plain run of the tiny plan (prose, then widening + python)."""
    from engine.plan import load_plan
    from engine.train.session import run as run_worker
    from tests.engine.train.test_variants import VARIANT_PLAN
    from widen_tui.launcher import create_run, create_runs

    variants = tmp_path / "variants.toml"
    variants.write_text(VARIANT_PLAN)
    runs = create_runs(load_plan(variants), variants) + [create_run(load_plan(tiny_plan), tiny_plan)]
    for run in runs:
        assert run_worker(run.path) == 0
    return [r.id for r in runs]


def test_compare_real_runs_table_axis_and_lineage(real_runs, widen_home):
    from textual.widgets import DataTable, TabbedContent

    from widen_tui.tui.widgets.loss_chart import LossChart

    lora, ffn, plain = real_runs

    async def check(pilot):
        screen = pilot.app.screen
        # the table: one row per run (three plans/variants), figures from compare_runs
        table = screen.query_one("#table-figures", DataTable)
        names = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert names == ["lora", "ffn", "tiny"]
        assert any(s.key == "health" for s in comparison_sections(screen.data.table))

        # the models grew (operators added parameters mid-way): FLOPs is the default axis, said so
        chart = screen.query_one("#compare-chart", LossChart)
        assert chart.x_axis == "flops" and screen.data.grew
        assert "only FLOPs make them comparable" in str(screen.query_one("#compare-status").render())
        for key, axis in (("s", "steps"), ("t", "tokens"), ("x", "flops"), ("x", "steps")):
            await pilot.press(key)
            await pilot.pause()
            assert chart.x_axis == axis == screen.query_one("#lineage-chart", LossChart).x_axis
        assert "global step" in screen_text(pilot.app)

        # the lineage: the group's shared base, trained by lora, branching into both variants
        await pilot.press("3")
        await pilot.pause()
        assert screen.query_one(TabbedContent).active == "lineage"
        labels = tree_labels(screen)
        assert labels[0].startswith("tiny-variants")
        assert labels[1].startswith("● base: shared")
        assert labels[2:4] == ["○ lora (done)", "○ ffn (done)"]
        assert labels[4] == "○ tiny (done)"  # a run outside any group is its own root
        (group, single) = screen.data.lineage
        (base,) = group.children
        assert base.run_id == lora and "ffn start from the prefix cache" in base.detail
        branch = base.points[-1]
        for variant in base.children:  # each variant's curve continues the base's at the branch
            assert variant.joined_points()[0] is branch
            assert variant.points[0].global_step == branch.global_step + 1
        await pilot.press("escape")
        await pilot.pause()
        assert type(pilot.app.screen).__name__ != "CompareScreen"

    with_compare(widen_home, real_runs, check)


# -- growth lineage from hand-written runs --------------------------------------------------------


def test_plateau_growths_are_branch_points(tmp_path):
    ids = growth_pair(tmp_path)
    loaded = load_runs(tmp_path, ids)
    (group,) = build_lineage(loaded.runs)
    grown, fixed = group.children
    assert "no shared stages" in group.detail
    assert [n.kind for n in grown.walk()] == ["run", "growth", "growth"]
    first, second = grown.children[0], grown.children[0].children[0]
    assert first.label == "growth 1 @ step 12: +20,000 → 120,000"
    assert second.label == "growth 2 @ step 24: +20,000 → 140,000"
    assert [p.global_step for p in grown.points] == list(range(1, 13))
    assert first.joined_points()[0].global_step == 12 and first.points[0].global_step == 13
    assert second.joined_points()[0].global_step == 24 and second.points[-1].global_step == 40
    assert not fixed.children and len(fixed.points) == 40

    curves = lineage_curves([group])
    assert [c.label for c in curves] == ["grow-from-small", "grow-from-small g1", "grow-from-small g2", "final-size"]
    assert [n.short for n in charted_nodes([group])] == [c.label for c in curves]  # the tree's swatches
    # each growth segment starts at the branch point, with its ▲ there, on every axis
    for axis in ("steps", "tokens", "flops"):
        before, after = curves[0].train_series(axis)[0], curves[1].train_series(axis)[0]
        assert after[0] == before[-1]
        (mark,) = curves[1].expansion_marks(axis)
        assert mark.kind == "growth" and mark.x == before[-1][0]

    data = comparison(loaded.runs)  # equal compute from the events in memory, as compare_runs has it
    from engine.runs.compare import compare_runs
    from engine.runs.events import read_all

    disk = compare_runs([(r.info, r.status, r.results) for r in loaded.runs],
                        [read_all(tmp_path / r.id / "events.jsonl") for r in loaded.runs])
    assert all(r["loss_at_equal_flops"] is not None for r in disk["runs"])
    assert [r["loss_at_equal_flops"] for r in data["runs"]] == [r["loss_at_equal_flops"] for r in disk["runs"]]
    assert data["groups"][0]["loss_at_equal_flops"] == disk["groups"][0]["loss_at_equal_flops"]
    assert [s.key for s in comparison_sections(data)] == ["figures", "compute", "target"]


def test_growth_run_shows_its_branch_points_in_the_app(tmp_path):
    from widen_tui.tui.widgets.loss_chart import LossChart

    ids = growth_pair(tmp_path)

    async def check(pilot):
        screen = pilot.app.screen
        assert screen.query_one("#compare-chart", LossChart).x_axis == "flops"
        text = screen_text(pilot.app)
        assert "growth on plateau" in text  # the overlay's legend names the ▲ markers by their trigger
        assert "growth at step" not in text and "growth on budget" not in text
        await pilot.press("3")
        await pilot.pause()
        labels = tree_labels(screen)
        assert "▲ growth 1 @ step 12: +20,000 → 120,000" in labels
        assert "▲ growth 2 @ step 24: +20,000 → 140,000" in labels
        details = []
        for _ in range(3):  # the tree has the keys; the line under it describes the highlighted node
            await pilot.press("down")
            await pilot.pause()
            details.append(str(screen.query_one("#lineage-detail").render()))
        assert details[0].startswith("group 20250101-000000-pg-g001: 2 run(s) of plan progressive-growth")
        assert details[1].startswith("grow-from-small · 20250101-000000-grow-from-small-a1b2 · done")
        assert "plateau growth at step 12" in details[2] and "100,000 → 120,000 params" in details[2]

        # every key is a command too: the palette switches the axis
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"tokens")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause()
        assert screen.query_one("#lineage-chart", LossChart).x_axis == "tokens"

    with_compare(tmp_path, ids, check)


def test_the_legend_names_the_triggers_the_growths_used(tmp_path):
    """Growths fired by `at` (G_stack's fixed steps) are not "on plateau": the legend says what
    fired the ▲s, one entry per trigger the shown runs used."""
    from engine.runs.curves import curves_from_events
    from widen_tui.tui.widgets.loss_chart import LossChart, growth_words

    ids = growth_pair(tmp_path, trigger="at")
    marks = curves_from_events("g", load_runs(tmp_path, ids).runs[0].events).expansion_marks()
    assert [(m.kind, m.trigger) for m in marks] == [("growth", "at"), ("growth", "at")]
    assert [growth_words(t) for t in ("plateau", "at", "budget", None)] == [
        "growth on plateau", "growth at step", "growth on budget", "growth"]
    budget = growth_events(growths_at=(30,), trigger="budget")
    write_run(tmp_path, "20250101-000000-budget-e5f6", budget, name="pg-budget", plan_name="progressive-growth",
              variant="budget", results=fake_results(budget, ppl=8.2))

    async def check(pilot):
        assert pilot.app.screen.query_one("#compare-chart", LossChart).x_axis == "flops"
        text = screen_text(pilot.app)
        assert "growth at step (+40k params)" in text and "growth on budget (+20k params)" in text
        assert "growth on plateau" not in text

    with_compare(tmp_path, [*ids, "20250101-000000-budget-e5f6"], check, size=(100, 30))


def test_bases_per_seed_and_per_shared_training(tmp_path):
    """Seeds train their own shared stages (the cache key has the seed); so does a variant whose
    shared stages logged other losses (its own model)."""
    runs = []
    for seed in (0, 1):
        for variant, offset in (("a", 0.0), ("b", 0.0), ("own-model", 0.3)):
            events = growth_events(stages=(("shared", 10), (variant, 5)), offset=offset + 0.1 * seed,
                                   cached_stages=1 if variant == "b" else 0)
            runs.append(write_run(tmp_path, f"r-{variant}-s{seed}", events, name=f"pv-{variant}", plan_name="pv",
                                  variant=variant, seed=seed, group="g-pv", prefix_stages=1).id)
    loaded = load_runs(tmp_path, runs + ["no-such-run"])
    assert loaded.missing == ["no-such-run"]
    assert [r.label for r in loaded.runs][:3] == ["a s0", "b s0", "own-model s0"]
    (group,) = build_lineage(loaded.runs)
    bases = group.children
    assert [b.short for b in bases] == ["base 1", "base 2", "base 3", "base 4"]
    assert [[c.short for c in b.children] for b in bases] == [["a s0", "b s0"], ["own-model s0"],
                                                               ["a s1", "b s1"], ["own-model s1"]]
    assert bases[0].run_id == "r-a-s0"  # the run that trained the shared stage, not the cached copy
    assert all(b.label.endswith(f"seed {s}") for b, s in zip(bases, (0, 0, 1, 1)))


def test_seeds_are_mean_and_std_in_the_table(tmp_path):
    ids = []
    for seed, ppl in ((0, 8.0), (1, 9.0), (2, 10.0)):
        events = growth_events(offset=0.01 * seed)
        ids.append(write_run(tmp_path, f"r-s{seed}", events, name="plain", plan_name="plain", seed=seed,
                             results=fake_results(events, ppl=ppl)).id)
    (row,) = comparison_sections(comparison(load_runs(tmp_path, ids).runs))[0].rows
    assert row[:3] == ["plain", "0,1,2", "9.00±1.00"]


# -- snapshot ------------------------------------------------------------------------------------


def test_compare_snapshot(tmp_path, snap_compare):
    """The lineage tab of the growth pair at 80×24 (deterministic hand-written runs)."""
    ids = growth_pair(tmp_path)

    async def open_lineage(pilot):
        pilot.app.open_compare(ids)
        await wait_for_data(pilot)
        await pilot.press("3")
        await pilot.pause()

    assert snap_compare(WidenApp(tmp_path), terminal_size=(80, 24), run_before=open_lineage)
