"""Compute to target (engine.runs.compute_to_target, `widen compare --target-loss`) on hand-made
event streams: interpolation between eval points, not reached, auto from the baseline (a run that
did not grow by default; the worst of its seeds, and the strictest target, the best), mean ± std
over seeds, ratios; the CLI through a real subprocess."""

from __future__ import annotations

import json
import math

import pytest

from engine.runs import compute_to_target as ctt
from engine.runs.records import EvalEvent, EventRecord, StageEvent, StepEvent, parse_event
from tests.conftest import widen
from tests.widen_tui.tui.test_tui_compare import fake_results, write_run

BATCH_TOKENS, SPEED, FLOPS_PER_STEP = 256, 5000.0, 1000.0


def stream(evals: dict[int, float], steps: int = 40, *, task: str = "python", flops_per_step: float = FLOPS_PER_STEP,
           stages: tuple[tuple[str, int], ...] | None = None, grow_at: int | None = None) -> list[EventRecord]:
    """Events as engine/train/loop.py writes them: a step event per step (tokens, FLOPs, speed), and a
    held-out eval of `task` at each global step of `evals` (0: the initial model); `grow_at`: a
    growth (trigger "at") after that global step takes the model from 10 to 20 parameters."""
    stages = stages or ((task, steps),)
    events, t = [], [1000.0]

    def emit(kind, **fields):
        t[0] += 1.0
        events.append(parse_event({"type": kind, "t": t[0], **fields}))

    emit("start", run="r", plan="p", seed=0, device="cpu", pid=1, params=10, stages=len(stages), resumed=False,
         stage_steps=[n for _, n in stages])
    g, tokens, flops, params = 0, 0, 0.0, 10

    def evaluate(stage, step):
        if g in evals:
            loss = evals[g]
            emit("eval", stage=stage, step=step, task=task, loss=loss, ppl=math.exp(loss), bpb=loss / math.log(2),
                 tokens=tokens, flops=flops, global_step=g)

    evaluate(-1, 0)
    for stage, (stage_task, n) in enumerate(stages):
        emit("stage", stage=stage, name=stage_task, task=stage_task, steps=n, phase="begin", global_step=g,
             tokens=tokens, flops=flops)
        for step in range(1, n + 1):
            g, tokens, flops = g + 1, tokens + BATCH_TOKENS, flops + flops_per_step
            emit("step", stage=stage, step=step, global_step=g, loss=3.0, lr=1e-3, tokens_per_s=SPEED, tokens=tokens,
                 flops=flops, params=params)
            if g == grow_at:
                emit("expand", stage=stage, op="widen_ffn", params_before=params, params_after=2 * params,
                     params_added=params, trainable=2 * params, exact=True, max_abs_logit_delta=0.0, loss_before=3.0,
                     loss_after=3.0, trigger="at", growth=0, step=step, global_step=g, tokens=tokens, flops=flops)
                params *= 2
            evaluate(stage, step)
        emit("stage", stage=stage, name=stage_task, task=stage_task, steps=n, phase="end", params=10, trainable=10)
    emit("status", state="done")
    return events


def run(run_id: str, events, **info) -> ctt.RunInput:
    return ctt.RunInput(run_id, {"name": info.pop("name", run_id), **info}, events)


def test_exact_interpolation_between_two_eval_points():
    report = ctt.compute_to_target([run("a", stream({0: 5.0, 10: 4.0, 20: 3.0, 30: 2.5}))], target=3.5)
    (row,) = report.runs
    c = row.crossing
    assert c.reached and c.how == "interpolated" and c.global_step == pytest.approx(15.0)
    assert c.flops == pytest.approx(15 * FLOPS_PER_STEP)
    assert c.tokens == pytest.approx(15 * BATCH_TOKENS)
    assert c.time_s == pytest.approx(15 * BATCH_TOKENS / SPEED)
    assert c.bracket_steps == (10.0, 20.0) and c.bracket_flops == pytest.approx((10_000.0, 20_000.0))
    assert row.eval_every_steps == pytest.approx(10.0)
    assert "evals every 10 steps; between 1e+04 and 2e+04 FLOPs" == ctt.density(row)
    assert row.ratio == {"flops": 1.0, "tokens": 1.0, "time_s": 1.0}  # it is its own baseline


def test_crossing_is_priced_by_the_steps_not_spread_evenly():
    """Interpolation is in steps, mapped through the step events: a model that costs 3× per step
    after a growth at step 10 pays that from step 10 on."""
    events, flops = [], 0.0
    for e in stream({0: 5.0, 20: 3.0}):
        if isinstance(e, StepEvent):
            flops += FLOPS_PER_STEP * (1 if e.global_step <= 10 else 3)
            e = e.model_copy(update={"flops": flops})
        elif isinstance(e, EvalEvent):
            e = e.model_copy(update={"flops": 0.0 if e.global_step == 0 else 40_000.0})
        events.append(e)
    (row,) = ctt.compute_to_target([run("a", events)], target=3.5).runs
    assert row.crossing.global_step == pytest.approx(15.0)
    assert row.crossing.flops == pytest.approx(10_000 + 5 * 3_000)  # not 0.75 · 40,000


def test_not_reached_is_never_a_number():
    base = run("base", stream({0: 5.0, 20: 3.0, 40: 2.0}))
    slow = run("slow", stream({0: 5.0, 20: 4.0, 40: 3.5}))
    report = ctt.compute_to_target([base, slow], target=3.0)
    assert not report.runs[1].crossing.reached
    assert report.runs[1].ratio == {"flops": None, "tokens": None, "time_s": None}
    columns, rows = ctt.group_rows(report)
    slow_row = dict(zip(columns, rows[1]))
    assert slow_row["FLOPs"] == slow_row["FLOPs ratio"] == slow_row["time ratio"] == "not reached"
    assert slow_row["reached"] == "0/1"
    assert report.groups[1].figures["flops"] is None and report.groups[1].ratio["flops"] is None


def test_auto_is_the_baseline_final_held_out_loss_and_ratios_divide_by_it():
    base = run("base", stream({0: 5.0, 20: 4.0, 40: 3.0}))            # reaches 3.0 at step 40
    fast = run("fast", stream({0: 5.0, 10: 3.0, 40: 2.0}, flops_per_step=2 * FLOPS_PER_STEP))
    report = ctt.compute_to_target([base, fast])  # auto, baseline: the first run
    assert report.auto and report.target == 3.0 and report.baseline == "base"
    b, f = report.runs
    assert b.crossing.global_step == 40 and f.crossing.global_step == 10
    assert f.ratio["tokens"] == pytest.approx(10 / 40)
    assert f.ratio["flops"] == pytest.approx(2 * 10 / 40)
    assert f.ratio["time_s"] == pytest.approx(10 / 40)
    assert "baseline: the first run given, as no run grew (base)" in report.rule
    assert "the baseline's final held-out loss (auto; one baseline seed: the strictest target is the same)" in report.rule
    assert report.strict_target == 3.0 and not report.strict_differs and ctt.strict_rows(report) is None
    # another baseline: the ratios divide by its figures, auto follows its final loss
    other = ctt.compute_to_target([base, fast], baseline="fast")
    assert other.target == 2.0 and other.runs[1].ratio["tokens"] == 1.0 and not other.runs[0].crossing.reached


def test_default_baseline_is_a_run_that_did_not_grow():
    """A progressive experiment given grown arm first: the from-scratch arm is the baseline (against
    the grown one's final loss the fixed model would be "not reached" more often than not)."""
    grown = run("grown", stream({0: 5.0, 20: 3.5, 40: 2.5}, grow_at=20))
    fixed = run("fixed", stream({0: 5.0, 20: 4.0, 40: 3.0}))
    report = ctt.compute_to_target([grown, fixed])
    assert report.baseline == "fixed" and report.target == 3.0
    assert "baseline: the run that did not grow (fixed)" in report.rule
    g, f = report.runs
    assert g.crossing.reached and f.crossing.reached and f.ratio["tokens"] == 1.0
    assert g.crossing.global_step == pytest.approx(30.0) and g.ratio["tokens"] == pytest.approx(30 / 40)
    columns, rows = ctt.group_rows(report)
    assert [row[0] for row in rows] == ["grown", "fixed (baseline)"]
    # every run grew: the first; --baseline still wins over the default
    both = [grown, run("grown2", stream({0: 5.0, 40: 2.0}, grow_at=10))]
    every = ctt.compute_to_target(both)
    assert every.baseline == "grown" and "baseline: the first run given, as every run grew (grown)" in every.rule
    assert ctt.compute_to_target([grown, fixed], baseline="grown").baseline == "grown"
    # seeds of the fixed variant: the variant that did not grow, its first seed's id
    seeds = [run(f"fixed-s{s}", stream({0: 5.0, 40: 3.0 + s / 10}), name="fixed", plan_name="p", variant="fixed",
                 seed=s) for s in (0, 1)]
    report = ctt.compute_to_target([grown, *seeds])
    assert report.baseline == "fixed-s0" and report.baseline_group == "p/fixed"
    assert "baseline: the variant that did not grow (fixed-s0)" in report.rule
    several = ctt.compute_to_target([grown, fixed, *seeds])  # two variants did not grow: the first of them
    assert several.baseline == "fixed" and "baseline: the first run that did not grow (fixed)" in several.rule
    with pytest.raises(ctt.TargetError, match="--baseline nope is not among the runs compared"):
        ctt.compute_to_target([grown, fixed], baseline="nope")


def test_compare_data_and_the_target_share_one_definition_of_growing():
    from engine.runs.compare import model_grew
    from engine.runs.compare_data import LoadedRun

    grown, fixed = stream({0: 5.0, 40: 3.0}, grow_at=20), stream({0: 5.0, 40: 3.0})
    assert model_grew(grown) and not model_grew(fixed)
    assert LoadedRun("g", {}, {}, None, grown).grew and not LoadedRun("f", {}, {}, None, fixed).grew
    # a stage's operators change the parameter count between steps: grown too (no trigger)
    widened = [e.model_copy(update={"params": 20}) if isinstance(e, StepEvent) and e.global_step > 20 else e
               for e in fixed]
    assert model_grew(widened)


def baseline_seeds(finals=(3.2, 2.9, 3.0)) -> list[ctt.RunInput]:
    """Three seeds of a fixed-size baseline ending at `finals`, and two grown seeds: one reaches
    2.9 (at step 20), one only 2.95."""
    runs = [run(f"scratch-s{s}", stream({0: 5.0, 20: 4.0, 40: final}), name="scratch", plan_name="pg",
                variant="scratch", seed=s) for s, final in enumerate(finals)]
    runs += [run(f"grow-s{s}", stream({0: 5.0, 20: at_20, 40: 2.95}, grow_at=10), name="grow", plan_name="pg",
                 variant="grow", seed=s) for s, at_20 in enumerate((2.9, 3.1))]
    return runs


def test_auto_target_is_the_worst_baseline_seed_and_the_strictest_the_best():
    report = ctt.compute_to_target(baseline_seeds())
    assert report.baseline == "scratch-s0" and report.baseline_group == "pg/scratch"
    assert report.target == 3.2 and report.strict_target == 2.9 and report.strict_differs
    assert report.baseline_finals == {"scratch-s0": 3.2, "scratch-s1": 2.9, "scratch-s2": 3.0}
    scratch, grow = report.groups
    assert scratch.reached == 3 and grow.reached == 2  # every baseline seed reaches the worst seed's loss
    assert scratch.strict_reached == 1 and grow.strict_reached == 1
    assert [r.strict_reached for r in report.runs] == [False, True, False, True, False]
    assert ("target 3.2000 = the worst final held-out loss of the baseline's 3 seeds, which every one of them "
            "reaches (auto); strictest target 2.9000 = the best seed's") in report.rule
    columns, rows = ctt.strict_rows(report)
    assert columns == ["variant", "seeds", "reached"]
    assert rows == [["pg/scratch (baseline)", "0,1,2", "1/3"], ["pg/grow", "0,1", "1/2"]]
    assert "reached 2.9000, the best baseline seed's final loss" in ctt.strict_title(report)
    as_json = report.to_json()
    assert as_json["strict_target"] == 2.9 and as_json["groups"][1]["strict_reached"] == 1
    # a given target: no strictest target, nothing counted against it
    fixed = ctt.compute_to_target(baseline_seeds(), target=3.0)
    assert fixed.strict_target is None and fixed.groups[0].strict_reached is None and ctt.strict_rows(fixed) is None
    # seeds that ended alike: one target, said once
    alike = ctt.compute_to_target(baseline_seeds(finals=(3.0, 3.0, 3.0)))
    assert alike.target == alike.strict_target == 3.0 and ctt.strict_rows(alike) is None
    assert "they ended at the same loss: the strictest target is the same" in alike.rule


def test_a_baseline_without_evals_of_the_task_is_one_error():
    no_evals = run("quiet", stream({}))
    with pytest.raises(ctt.TargetError, match="the baseline quiet has no held-out evals of task 'python' — no auto "
                                              "target"):
        ctt.compute_to_target([no_evals, run("b", stream({0: 5.0, 40: 3.0}))])


def test_seeds_are_mean_and_std_per_variant():
    runs = [run("base", stream({0: 5.0, 40: 3.0}), name="base")]
    for seed, at in ((0, 10), (1, 20), (2, 30)):
        runs.append(run(f"wide-s{seed}", stream({0: 5.0, at: 3.0, 40: 2.9}), name="wide", plan_name="p",
                        variant="wide", seed=seed))
    report = ctt.compute_to_target(runs, target=3.0)
    base, wide = report.groups
    assert wide.group == "p/wide" and wide.seeds == [0, 1, 2] and wide.reached == 3
    assert wide.figures["tokens"] == pytest.approx({"mean": 20 * BATCH_TOKENS, "std": 10 * BATCH_TOKENS, "n": 3})
    assert wide.ratio["flops"]["mean"] == pytest.approx(0.5) and wide.ratio["flops"]["std"] == pytest.approx(0.25)
    columns, rows = ctt.group_rows(report)
    assert dict(zip(columns, rows[1]))["FLOPs ratio"] == "×0.50±0.25"
    assert rows[0][0] == "base (baseline)"
    # one seed that never gets there: the variant is "not reached", not a mean of the others
    runs.append(run("wide-s3", stream({0: 5.0, 40: 3.4}), name="wide", plan_name="p", variant="wide", seed=3))
    wide = ctt.compute_to_target(runs, target=3.0).groups[1]
    assert wide.reached == 3 and wide.figures["flops"] is None and wide.ratio["flops"] is None


def test_initial_model_already_below_and_first_eval_below():
    report = ctt.compute_to_target([run("a", stream({0: 2.0, 20: 1.0})), run("b", stream({20: 2.0, 40: 1.5}))],
                                   target=2.5)
    a, b = report.runs
    assert a.crossing.how == "initial model" and a.crossing.flops == 0
    assert b.crossing.how == "at the first eval (already below)" and b.crossing.global_step == 20


def test_task_choice():
    one = run("one", stream({0: 5.0, 40: 3.0}, stages=(("prose", 20), ("python", 20))))
    prose = run("prose", stream({0: 5.0, 40: 3.0}, task="prose", stages=(("python", 20), ("prose", 20))))
    # the only task evaluated
    assert ctt.compute_to_target([one]).task == "python"
    # two tasks, the last stages differ: ambiguous, the error names --task
    as_prose = [e.model_copy(update={"task": "prose"}) for e in prose.events if isinstance(e, EvalEvent)]
    both = [one, run("two", one.events + as_prose)]
    both[0] = run("one", one.events + as_prose)
    last_prose = run("p2", both[0].events[:1] + [e.model_copy(update={"task": "prose"}) if isinstance(e, StageEvent)
                                                 else e for e in both[0].events[1:]])
    with pytest.raises(ctt.TargetError, match="--task"):
        ctt.compute_to_target([both[0], last_prose])
    assert ctt.compute_to_target(both).task == "python"  # both end on python
    with pytest.raises(ctt.TargetError, match="no held-out evals of task 'maths'"):
        ctt.compute_to_target(both, task="maths")


def test_parse_target():
    assert ctt.parse_target("auto") is None and ctt.parse_target("2.5") == 2.5
    for bad in ("low", "nan", "inf"):
        with pytest.raises(ctt.TargetError):
            ctt.parse_target(bad)


# -- the CLI ---------------------------------------------------------------------------------------


def write(root, run_id, events, **info):
    write_run(root, run_id, events, results=fake_results(events, ppl=8.0), **info)


def test_cli_compare_target_loss(tmp_path):
    root = tmp_path / "runs"
    write(root, "r-base", stream({0: 5.0, 20: 4.0, 40: 3.0}), name="base")
    write(root, "r-fast", stream({0: 5.0, 10: 3.0, 40: 2.0}, flops_per_step=2 * FLOPS_PER_STEP), name="fast")

    proc = widen("compare", "r-base", "r-fast", "--target-loss", "auto", env_home=root)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "compute to target" in out and "first reached 3.0000" in out
    assert "×0.50" in out and "evals every" in out and "base (baseline)" in out

    proc = widen("compare", "r-base", "r-fast", "--target-loss", "2.5", "--baseline", "r-fast", "--json",
                 env_home=root)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["compute_to_target"]
    assert report["baseline"] == "r-fast" and report["target"] == 2.5 and not report["auto"]
    base, fast = report["runs"]
    assert base["crossing"]["reached"] is False and base["ratio"]["flops"] is None
    assert fast["crossing"]["global_step"] == pytest.approx(25.0)  # 10 + 30 · (3 - 2.5) / (3 - 2)

    proc = widen("compare", "r-base", "r-fast", "--target-loss", "1.0", env_home=root)
    assert proc.returncode == 0 and "not reached" in proc.stdout


def test_cli_compare_auto_target_over_baseline_seeds(tmp_path):
    """The grown arm given first: the baseline is the arm that did not grow; its worst seed's final
    loss is the target, and the strictest target (its best seed's) has a table of its own."""
    root = tmp_path / "runs"
    for r in baseline_seeds():
        write(root, r.id, r.events, name=r.info["name"], plan_name="pg", variant=r.info["variant"],
              seed=r.info["seed"])
    ids = [f"grow-s{s}" for s in (0, 1)] + [f"scratch-s{s}" for s in (0, 1, 2)]
    proc = widen("compare", *ids, "--target-loss", "auto", env_home=root)
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())  # the titles wrap at the terminal's width
    assert "baseline: the variant that did not grow (scratch-s0)" in out
    assert "first reached 3.2000" in out and "strictest target 2.9000 = the best seed's" in out
    assert "strictest target: how many seeds' held-out loss on python reached 2.9000" in out
    strict_table = proc.stdout.split("strictest target: how many", 1)[1]
    assert "scratch (baseline)" in strict_table and "1/3" in strict_table and "1/2" in strict_table

    proc = widen("compare", *ids, "--target-loss", "auto", "--json", env_home=root)
    report = json.loads(proc.stdout)["compute_to_target"]
    assert report["baseline"] == "scratch-s0" and report["target"] == 3.2 and report["strict_target"] == 2.9
    assert {g["group"]: (g["reached"], g["strict_reached"]) for g in report["groups"]} == {
        "pg/grow": (2, 1), "pg/scratch": (3, 1)}
    assert report["baseline_finals"] == {"scratch-s0": 3.2, "scratch-s1": 2.9, "scratch-s2": 3.0}

    # one baseline seed: one target, said once, no second table
    proc = widen("compare", "grow-s0", "scratch-s1", "--target-loss", "auto", env_home=root)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "first reached 2.9000" in out
    assert out.count("the strictest target is the same") == 1 and "strictest target: how many" not in out


@pytest.mark.parametrize("args, message", [
    (["--target-loss", "auto", "--task", "maths"], "--task: run r-base has no held-out evals of task 'maths'"),
    (["--target-loss", "low"], "--target-loss must be a loss (a number) or auto, not 'low'"),
    (["--task", "python"], "--task and --baseline go with --target-loss"),
])
def test_cli_bad_target_arguments_are_one_line(tmp_path, args, message):
    root = tmp_path / "runs"
    write(root, "r-base", stream({0: 5.0, 40: 3.0}), name="base")
    proc = widen("compare", "r-base", *args, env_home=root)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {message}" + proc.stderr.strip().split(message, 1)[1]]
    assert "Traceback" not in proc.stderr


# -- the TUI -------------------------------------------------------------------------------------


def test_compare_screen_shows_compute_to_target(tmp_path):
    """The Compare screen's table tab: the same variant rows as `widen compare --target-loss auto`."""
    from textual.widgets import DataTable

    from tests.widen_tui.tui.test_tui_compare import with_compare

    root = tmp_path / "runs"
    write(root, "r-base", stream({0: 5.0, 20: 4.0, 40: 3.0}), name="base")
    write(root, "r-fast", stream({0: 5.0, 10: 3.0, 40: 2.0}), name="fast")

    async def check(pilot):
        await pilot.press("2")
        await pilot.pause()
        table = pilot.app.screen.query_one("#table-target", DataTable)
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        assert rows[0][:3] == ["base (baseline)", "0", "1/1"]
        assert rows[1][0] == "fast" and rows[1][6] == "×0.25"  # tokens ratio: 10 steps against 40
        assert not pilot.app.screen.query("#table-strict")  # one baseline seed: the strictest target is the same

    with_compare(root, ["r-base", "r-fast"], check)


def test_compare_screen_takes_the_arm_that_did_not_grow_and_counts_the_strictest_target(tmp_path):
    """The TUI's default is the CLI's: grown arm first, yet the baseline is the fixed-size arm,
    the target its worst seed's final loss, and the strictest target has its own table."""
    from textual.widgets import DataTable

    from tests.widen_tui.tui.test_tui_compare import with_compare

    root = tmp_path / "runs"
    for r in baseline_seeds():
        write(root, r.id, r.events, name=r.info["name"], plan_name="pg", variant=r.info["variant"],
              seed=r.info["seed"])
    ids = [f"grow-s{s}" for s in (0, 1)] + [f"scratch-s{s}" for s in (0, 1, 2)]

    async def check(pilot):
        await pilot.press("2")
        await pilot.pause()
        screen = pilot.app.screen
        assert screen.data.table["target"].baseline == "scratch-s0"
        target = screen.query_one("#table-target", DataTable)
        rows = [[str(c) for c in target.get_row_at(i)] for i in range(target.row_count)]
        assert [row[:3] for row in rows] == [["pg/grow", "0,1", "2/2"], ["pg/scratch (baseline)", "0,1,2", "3/3"]]
        strict = screen.query_one("#table-strict", DataTable)
        assert [[str(c) for c in strict.get_row_at(i)] for i in range(strict.row_count)] == [
            ["pg/grow", "0,1", "1/2"], ["pg/scratch (baseline)", "0,1,2", "1/3"]]

    with_compare(root, ids, check)


# -- the figure ----------------------------------------------------------------------------------


def test_plot_draws_the_target_and_each_crossing(tmp_path):
    from matplotlib.figure import Figure

    from engine.runs.curves import curves_from_events
    from widen_tui.views import plot as figures

    runs = [run("base", stream({0: 5.0, 20: 4.0, 40: 3.0})), run("fast", stream({0: 5.0, 10: 3.0, 40: 2.0})),
            run("slow", stream({0: 5.0, 40: 4.5}))]
    report = ctt.compute_to_target(runs, labels=["base", "fast", "slow"])
    curves = [curves_from_events(label, r.events) for label, r in zip(["base", "fast", "slow"], runs)]
    ax = Figure().add_subplot()
    figures._draw_target(ax, report, curves, ["C0", "C1", "C2"], "flops")
    line, *marks = ax.lines
    assert list(line.get_ydata()) == [3.0, 3.0]
    assert [(m.get_xdata()[0], m.get_ydata()[0], m.get_color()) for m in marks] == [
        (40 * FLOPS_PER_STEP, 3.0, "C0"), (10 * FLOPS_PER_STEP, 3.0, "C1")]  # slow never reached it: no mark


def test_cli_plot_with_target_loss(tmp_path):
    root = tmp_path / "runs"
    write(root, "r-base", stream({0: 5.0, 20: 4.0, 40: 3.0}), name="base")
    write(root, "r-fast", stream({0: 5.0, 10: 3.0, 40: 2.0}), name="fast")
    out = tmp_path / "figures"
    proc = widen("plot", "r-base", "r-fast", "--x", "flops", "--target-loss", "auto", "--out", str(out),
                 env_home=root)
    assert proc.returncode == 0, proc.stderr
    assert (out / "loss.png").stat().st_size > 10_000
    proc = widen("plot", "r-base", "--target-loss", "auto", "--task", "maths", "--out", str(out), env_home=root)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and errors == ["error: --task: run r-base has no held-out evals of task 'maths' — "
                                               "its tasks: python"] and "Traceback" not in proc.stderr
