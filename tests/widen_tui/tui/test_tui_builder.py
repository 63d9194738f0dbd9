"""The plan builder: a plan built with the keyboard, checked live, previewed, saved and launched;
ready plans loaded and saved back unchanged; the parameter preview held equal to the measured
parameters of the real operators."""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time
import tomllib
from pathlib import Path

import pytest

import widen_tui.tui.app
from engine.grow.preview import preview_plan
from engine.plan import load_plan, plan_from_dict
from engine.runs.rundir import RunDir, read_json
from widen_tui.launcher import cancel
from widen_tui.tui.app import WidenApp
from widen_tui.tui.plan_draft import stage_refs
from widen_tui.tui.screens.builder import BuilderScreen
from widen_tui.tui.widgets.param_preview import ParamPreview

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[3]
EXPERIMENTS = ROOT / "experiments"
APP_CSS = str(Path(widen_tui.tui.app.__file__).parent / "app.tcss")  # a subclass here would look beside this file


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def quick_checks(monkeypatch):
    """Check after 20 ms of quiet instead of the interactive 300 ms (the pilot types fast)."""
    import widen_tui.tui.screens.builder as builder

    monkeypatch.setattr(builder, "CHECK_DELAY", 0.02)


class BuilderApp(WidenApp):
    """The app with the builder as its only screen; the monitor it opens is recorded, not shown."""

    CSS_PATH = APP_CSS

    def __init__(self, root: Path, plan: Path | None = None):
        super().__init__(root=root)
        self.plan_file = plan
        self.monitored: list[str] = []

    def on_mount(self, event) -> None:
        event.prevent_default()  # not the Runs screen: the builder alone
        self.push_screen(BuilderScreen(self.plan_file))

    def open_monitor(self, run_id: str) -> None:
        self.monitored.append(run_id)


async def wait_until(pilot, condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            sc = pilot.app.screen
            raise AssertionError(f"timed out waiting for the builder {sc} {getattr(sc, 'checking', None)} {getattr(sc, 'generation', None)} {getattr(getattr(sc, 'result', None), 'generation', None)} {[ (w.name, w.state, w.error) for w in pilot.app.workers]}")
        await pilot.pause(0.05)


async def settled(pilot) -> BuilderScreen:
    """The builder once its latest check is shown."""
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, BuilderScreen) and pilot.app.screen.settled)
    await pilot.pause()
    return pilot.app.screen


async def type_into(pilot, widget_id: str, text: str) -> None:
    """Focus a field, clear it with the keyboard, type `text`."""
    pilot.app.screen.query_one(f"#{widget_id}").focus()
    await pilot.pause()
    await pilot.press("end", "ctrl+u", *text)


def problems(screen: BuilderScreen) -> dict[str, str]:
    return {p.path: p.message for p in screen.result.problems}


def shown_problem(screen: BuilderScreen, row_id: str) -> str:
    return screen.query_one(f"#{row_id}").problem


# ---------------------------------------------------------------------------------------------
# the main flow, all keyboard


async def test_build_save_and_launch_a_plan_with_the_keyboard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the file name the save prompt offers is relative: plans/<name>.toml
    root = tmp_path / "runs"
    app = BuilderApp(root)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "PlanPicker")
        await pilot.press("enter")  # the first choice: a new plan from scratch
        screen = await settled(pilot)
        assert screen.result.problems == []  # the blank plan is valid as it stands

        await type_into(pilot, "f-name", "kb")
        # a second task (its source: the standard library's Python), renamed
        await pilot.press("ctrl+n")
        await pilot.pause()
        await type_into(pilot, "taskname-tasks-task2", "python")
        await pilot.press("enter")
        await pilot.pause()
        assert screen.raw["tasks"]["python"] == {"source": "builtin:stdlib-python"}
        await type_into(pilot, "f-tasks-python-max_docs", "40")
        await type_into(pilot, "f-train-batch_size", "4")

        # stage 1: prose, 6 steps
        await pilot.press("f4")
        await type_into(pilot, "f-stages-0-steps", "6")
        # stage 2: python, base frozen
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert [r.path for r in stage_refs(screen.raw)] == [("stages", 0), ("stages", 1)]
        await pilot.press("enter", "down", "enter")  # the task select (focused): prose -> python
        await type_into(pilot, "f-stages-1-steps", "6")
        await type_into(pilot, "f-stages-1-freeze", "base")

        # operator 1: widen_ffn on blocks 0 and 2; a bad size shows the checker's message, then a good one
        await pilot.press("ctrl+g")
        await settled(pilot)
        assert problems(screen)["stages.1.expand.0.size"] == "is required — add it"
        await type_into(pilot, "f-stages-1-expand-0-size", "0")
        screen = await settled(pilot)
        message = shown_problem(screen, "row-stages-1-expand-0-size")
        assert "greater than 0" in message and "got 0" in message
        assert "greater than 0" in str(screen.query_one("#check-line").render())
        await type_into(pilot, "f-stages-1-expand-0-size", "16")
        screen = await settled(pilot)
        assert shown_problem(screen, "row-stages-1-expand-0-size") == ""
        screen.query_one("#layers-stages-1-expand-0").focus()
        await pilot.press("a", "right", "space", "right", "right", "space")  # none, then 0 and 2

        # operator 2: map_layers, the grid edited with the keyboard: 4 -> 6 blocks, one virtual repeat
        await pilot.press("ctrl+g")
        await pilot.pause()
        await pilot.press("enter", *"map", "enter")  # the op select, by typing: widen_ffn -> map_layers
        screen = await settled(pilot)
        assert screen.raw["stages"][1]["expand"][1] == {"op": "map_layers"}
        assert "give exactly one of mapping" in problems(screen)["stages.1.expand.1"]
        screen.query_one("#grid-stages-1-expand-1").focus()
        await pilot.press("down", "plus")       # after target 1, another use of source 1 (virtual)
        await pilot.press("down", "down", "plus")  # after target 4 (source 3), another use of block 3 ...
        await pilot.press("v")                  # ... made real
        screen = await settled(pilot)

        assert screen.result.problems == []
        stage = screen.raw["stages"][1]
        assert stage["expand"][0] == {"op": "widen_ffn", "layers": [0, 2], "size": 16}
        assert stage["expand"][1] == {"op": "map_layers", "mapping": [0, 1, 1, 2, 3, 3],
                                      "kinds": ["real", "real", "virtual", "real", "real", "real"]}

        # the preview: widen_ffn 2 x 16 x (128 + 1 + 128); the real repeat one whole block (virtual: none)
        preview = {s.path: s for s in screen.result.preview.stages}["stages.1"]
        assert [op.added for op in preview.ops] == [2 * 16 * (128 + 1 + 128), 197_888]
        assert preview.added == 8_224 + 197_888 and preview.trainable == preview.added
        assert "+206,112" in str(screen.query_one("#preview-line").render())
        table = screen.query_one(ParamPreview)
        assert table.get_row("stages.1")[2] == "+206,112"
        depths = screen.result.preview.op_depths()
        assert depths["stages.1.expand.1"] == {None: 4}

        # save (ctrl+s asks for a file name: there is none yet)
        target = tmp_path / "plans" / "kb.toml"
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "FileNamePrompt")
        await pilot.press("enter")  # the name offered: plans/kb.toml
        await wait_until(pilot, target.exists)
        assert not screen.modified
        saved = load_plan(target)
        assert saved == plan_from_dict(copy.deepcopy(screen.raw))
        assert saved.tasks.keys() == {"prose", "python"} and [s.task for s in saved.stages] == ["prose", "python"]
        assert tomllib.loads(target.read_text()) == screen.raw

        # launch: checked, saved, one run created and its worker started; the monitor asked for
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.monitored, timeout=30)
        run = RunDir(root / app.monitored[0])
        assert run.path.is_dir() and load_plan(run.plan) == saved
        status = read_json(run.status_json)
        assert status["state"] in ("queued", "running") and status["pid"] > 0
        assert cancel(run) == "cancel requested"  # no need to train: it was started, that is the point
        _reap(status["pid"])



def _reap(pid: int, timeout: float = 60.0) -> None:
    """Wait for the cancelled worker (our child) to exit, so no process outlives the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)


async def test_launch_refuses_a_plan_with_problems(tmp_path):
    plan = tmp_path / "bad.toml"
    text = (EXPERIMENTS / "quickstart.toml").read_text().replace("size = 128", "size = -1")
    plan.write_text(text)
    app = BuilderApp(tmp_path / "runs", plan)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await settled(pilot)
        assert "stages.1.expand.0.size" in problems(screen)
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: screen.query_one("TabbedContent").active == "tab-check")
        assert not (tmp_path / "runs").exists() and not app.monitored
        # enter on the problem goes to its field, on its stage
        screen.query_one("#problem-list").focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.focused is not None and screen.focused.id == "f-stages-1-expand-0-size")
        assert screen.query_one("TabbedContent").active == "tab-stages" and screen.stage_index == 1
        await pilot.press("ctrl+u", "6", "4")
        screen = await settled(pilot)
        assert screen.result.problems == [] and screen.raw["stages"][1]["expand"][0]["size"] == 64


MAPPING_PLAN = """
name = "helpers"
[model]
source = "builtin:tiny-neo"
[tasks.prose]
source = "builtin:pydoc"
[[stages]]
task = "prose"
steps = 1
[[stages.expand]]
op = "map_layers"
keep_ends = {depth = 5}
scale = 0.5
"""


async def test_mapping_helpers_fill_the_grid(tmp_path):
    plan = tmp_path / "helpers.toml"
    plan.write_text(MAPPING_PLAN)
    app = BuilderApp(tmp_path / "runs", plan)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await settled(pilot)
        await pilot.press("f4")
        await pilot.pause()
        grid = screen.query_one("#grid-stages-0-expand-0")
        assert grid.row_count == 5  # keep_ends resolved at depth 4: [0, 1, 2, 2, 3]
        assert not screen.modified  # shown, not written out
        await type_into(pilot, "keep-stages-0-expand-0", "6")
        await pilot.press("enter")
        screen = await settled(pilot)
        op = screen.raw["stages"][0]["expand"][0]
        assert op == {"op": "map_layers", "mapping": [0, 1, 1, 2, 2, 3], "scale": 0.5}  # repeats real (scaled)
        await type_into(pilot, "drop-stages-0-expand-0", "1")
        await pilot.press("enter")  # DUS: 2 copies, 1 dropped at the seam (SOLAR's recipe at depth 4)
        screen = await settled(pilot)
        assert screen.raw["stages"][0]["expand"][0]["mapping"] == [0, 1, 2, 1, 2, 3]
        grid.focus()
        await pilot.press("v")  # the first target is block 0 itself: no kind to choose
        await pilot.press("down", "down", "down", "v")  # a scaled repeat cannot be virtual: the checker says so
        screen = await settled(pilot)
        assert "scale" in problems(screen)["stages.0.expand.0"]
        assert "scale" in screen.query_one("#op-stages-0-expand-0").problem
        await pilot.press("v")
        screen = await settled(pilot)
        assert screen.result.problems == [] and "kinds" not in screen.raw["stages"][0]["expand"][0]


async def test_a_cleared_field_takes_the_default(tmp_path):
    plan = tmp_path / "quick.toml"
    shutil.copy(EXPERIMENTS / "quickstart.toml", plan)
    app = BuilderApp(tmp_path / "runs", plan)
    async with app.run_test(size=(80, 24)) as pilot:
        await settled(pilot)
        await type_into(pilot, "f-train-lr", "")
        screen = await settled(pilot)
        assert "lr" not in screen.raw["train"] and screen.result.problems == []
        assert "lr = " not in screen.result.toml.partition("[train]")[2].partition("[[stages]]")[0]


async def test_processes_and_strategy_have_fields_and_the_checker_knows_the_batch_must_divide(tmp_path):
    plan = tmp_path / "quick.toml"
    shutil.copy(EXPERIMENTS / "quickstart.toml", plan)
    app = BuilderApp(tmp_path / "runs", plan)
    async with app.run_test(size=(80, 24)) as pilot:
        await settled(pilot)
        await type_into(pilot, "f-train-distributed-nproc", "3")
        screen = await settled(pilot)
        assert screen.raw["train"]["distributed"] == {"nproc": 3}
        assert "does not divide into 3 equal parts" in problems(screen)["train.batch_size"]
        await type_into(pilot, "f-train-distributed-nproc", "2")
        screen = await settled(pilot)
        assert screen.result.problems == [] and "[train.distributed]" in screen.result.toml
        screen.query_one("#f-train-distributed-strategy").focus()
        await pilot.pause()
        await pilot.press("enter", "down", "down", "enter")  # the strategy select: (default) -> ddp -> fsdp
        screen = await settled(pilot)
        assert screen.raw["train"]["distributed"] == {"nproc": 2, "strategy": "fsdp"}
        assert screen.result.problems == [] and 'strategy = "fsdp"' in screen.result.toml


# ---------------------------------------------------------------------------------------------
# ready plans round-trip


async def test_compare_strategies_loads_and_saves_back_unchanged(tmp_path):
    plan = tmp_path / "compare_strategies.toml"
    shutil.copy(EXPERIMENTS / "compare_strategies.toml", plan)
    original = tomllib.loads(plan.read_text())
    app = BuilderApp(tmp_path / "runs", plan)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await settled(pilot)
        assert screen.result.problems == []
        assert len(stage_refs(screen.raw)) == 8  # the shared stage and 7 variants' own
        for _ in range(8):  # every stage's form drawn: showing a plan writes nothing
            await pilot.press("f8")
            await pilot.pause()
        await pilot.press("f3", "f5", "f6")
        screen = await settled(pilot)
        assert not screen.modified
        await pilot.press("ctrl+s")
        await pilot.pause()
    text = plan.read_text()
    assert text.startswith("# compare_strategies")  # the header comments stay
    assert "\n[[variants.stages.expand]]\nop = \"lora\"\n" in text  # written as people write plans
    assert tomllib.loads(text) == original
    assert load_plan(plan) == load_plan(EXPERIMENTS / "compare_strategies.toml")


@pytest.mark.parametrize("name", sorted(p.name for p in EXPERIMENTS.glob("*.toml")))
def test_every_ready_plan_round_trips_through_the_draft(name, tmp_path):
    from widen_tui.tui.plan_draft import load_draft, to_toml

    raw, header = load_draft(EXPERIMENTS / name)
    assert tomllib.loads(to_toml(raw, header)) == tomllib.loads((EXPERIMENTS / name).read_text())


def test_builder_snapshot(snap_compare):
    async def on_a_variants_stage(pilot):
        screen = await settled(pilot)
        await pilot.press("f4")
        await screen.show_stage(7)  # the widening+lora variant: two operators
        await settled(pilot)
        pilot.app.screen.query_one("#layers-variants-6-stages-0-expand-0").focus()
        await pilot.pause()

    app = BuilderApp(Path("/nonexistent-runs-root"), EXPERIMENTS / "compare_strategies.toml")
    assert snap_compare(app, terminal_size=(80, 24), run_before=on_a_variants_stage)


# ---------------------------------------------------------------------------------------------
# the parameter preview equals what the operators really add


ALL_OPS_PLAN = """
name = "preview-all-ops"
seed = 1
[model]
source = "builtin:tiny-neo"
[tasks.prose]
source = "builtin:pydoc"
eval_fraction = 0.2
[train]
batch_size = 2
seq_len = 16
device = "cpu"

[[stages]]
task = "prose"
steps = 0
freeze = "base"
[[stages.expand]]
op = "widen_ffn"
layers = [0, 2]
size = 24
[[stages.expand]]
op = "widen_ffn"
layers = [1]
size = 8
mode = "inplace"
[[stages.expand]]
op = "widen_ffn"
layers = [1]
size = 4
mode = "inplace"
[[stages.expand]]
op = "parallel_linear"
modules = ["up"]
layers = [3]
[[stages.expand]]
op = "widen_ffn"
layers = [3]
size = 4
mode = "inplace"

[[stages]]
task = "prose"
steps = 0
freeze = "base"
[[stages.expand]]
op = "map_layers"
mapping = [0, 1, 1, 2, 3, 3, 2]
kinds = ["real", "real", "virtual", "real", "real", "real", "virtual"]
[[stages.expand]]
op = "lora"
modules = ["q", "v", "o", "up", "down"]
r = 4
layers = [1, 2, 5]
[[stages.expand]]
op = "ia3"
layers = [2, 3]

[[stages]]
task = "prose"
steps = 0
freeze = "none"
[[stages.expand]]
op = "insert_identity"
layers = [0, 2]
[[stages.expand]]
op = "concat_linear"
size = 16
layers = [0, 1]
[[stages.expand]]
op = "parallel_linear"
modules = ["o", "k", "down"]
layers = [0, 6]
[[stages.expand]]
op = "map_layers"
keep_ends = {depth = 12}
[[stages.expand]]
op = "unshare"
[[stages.expand]]
op = "split_residual"
layers = [3]
k = 3
"""

MLP_PLAN = """
name = "preview-mlp"
[model]
source = "builtin:mlp"
[tasks.prose]
source = "builtin:pydoc"
eval_fraction = 0.2
[train]
batch_size = 2
seq_len = 16
device = "cpu"
[[stages]]
task = "prose"
steps = 0
freeze = "base"
[[stages.expand]]
op = "widen_mlp"
size = 16
layers = [0]
[[stages.expand]]
op = "widen_mlp"
size = 8
mode = "inplace"
[[stages.expand]]
op = "concat_linear"
size = 4
modules = [1]
[[stages.expand]]
op = "parallel_linear"
modules = [0, 2]
"""


@pytest.mark.parametrize("text", [ALL_OPS_PLAN, MLP_PLAN], ids=["tiny-neo", "mlp"])
def test_param_preview_equals_the_measured_parameters(text, tmp_path, widen_home):
    """Every operator of the built-in models (widen_ffn parallel and in place, map_layers
    real and virtual and keep_ends, lora and ia3 on virtual twins, insert_identity, concat_linear,
    parallel_linear, unshare, split_residual; widen_mlp on the MLP): the preview's params_added,
    each stage's total and trainable equal build_from_plan's measurements exactly — including a
    tensor grown twice in one stage (the first growth no longer trainable) and a parallel delta
    merged away by an in-place widening. (Every family and operator: tests/engine/grow/test_preview_meta.py.)"""
    from engine.exports.hf_directory import build_from_plan

    path = tmp_path / "plan.toml"
    path.write_text(text)
    preview = preview_plan(tomllib.loads(text))
    _, _, _, reports = build_from_plan(load_plan(path))
    previewed = [op for stage in preview.stages for op in stage.ops]
    assert [(r["op"], r["params_added"]) for r in reports] == [(op.op, op.added) for op in previewed]
    for index, stage in enumerate(preview.stages):
        last = [r for r in reports if r["stage"] == index][-1]
        assert (stage.total_after, stage.trainable) == (last["params_after"], last["trainable"])
    assert preview.base_total == reports[0]["params_before"]


def test_preview_is_lenient_and_the_builder_torch_free():
    """An invalid operator is skipped (the later ones still preview), and the builder's process
    never imports torch (the preview runs in its helper process)."""
    import subprocess

    raw = {"name": "x", "model": {"source": "builtin:tiny-neo"}, "tasks": {"t": {"source": "builtin:pydoc"}},
           "stages": [{"task": "t", "steps": 1, "expand": [{"op": "widen_ffn", "size": -3},
                                                           {"op": "widen_ffn", "size": 8, "layers": [0]}]}]}
    stage = preview_plan(raw).stages[0]
    assert [(op.added, op.note) for op in stage.ops] == [(None, "invalid settings"), (8 * 257, "")]
    code = "import sys, widen_tui.tui.screens.builder, widen_tui.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
    assert preview_plan({}).base_total == 890_496  # the default model: builtin:tiny-neo
