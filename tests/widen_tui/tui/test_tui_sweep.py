"""The Sweep screen: open a sweep (a `widen sweep mapping --json` file, or a run's results) and run one
through the `widen sweep mapping` subprocess on a tiny local GPT-Neo directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.engine.grow.test_sweep import save_byte_level_neo
from tests.widen_tui.tui.test_tui_runs import APP_CSS, make_run, screen_text, wait_until
from widen_tui.tui.app import WidenApp
from widen_tui.tui.screens.sweep import SweepScreen, SweepSourceError, load_sweep, sweep_command

pytestmark = pytest.mark.anyio

# A sweep as `widen sweep mapping --json` prints it (4 -> 5 layers, 6 mappings), figures fixed.
SWEEP = {
    "model": "builtin:tiny-neo", "run": None, "task": "builtin:pydoc", "keep_ends": True, "mappings_file": None,
    "depth": 5, "source_layers": 4, "tokens": 512,
    "rows": [
        {"mapping": [0, 1, 3, 3, 3], "ppl": 248.754, "loss": 5.5165, "reference": False},
        {"mapping": [0, 3, 3, 3, 3], "ppl": 249.195, "loss": 5.5182, "reference": False},
        {"mapping": None, "ppl": 250.244, "loss": 5.5224, "reference": True},
        {"mapping": [0, 0, 1, 1, 3], "ppl": 250.378, "loss": 5.5230, "reference": False},
        {"mapping": [0, 1, 1, 2, 3], "ppl": 250.402, "loss": 5.5231, "reference": False},
        {"mapping": [0, 0, 2, 3, 3], "ppl": 251.466, "loss": 5.5273, "reference": False},
        {"mapping": [0, 0, 0, 0, 3], "ppl": 252.364, "loss": 5.5309, "reference": False},
    ],
    "speedup": 1.341, "naive_s": 0.0265, "cached_s": 0.0197, "block_calls": {"cached": 44, "naive": 60},
    "naive_max_loss_diff": 0.0, "replay_check": 0.0, "batch_size": 4, "seq_len": 64, "batches": 2,
}
SMALL = ("--batches", "1", "--batch-size", "2", "--seq-len", "32", "--device", "cpu")


@pytest.fixture
def anyio_backend():
    return "asyncio"


class SweepApp(WidenApp):
    """The app with the Sweep screen on top of Runs (as `s` opens it)."""

    CSS_PATH = APP_CSS

    def __init__(self, root: Path, source: str | None = None, extra_args=()):
        super().__init__(root)
        self.sweep_source = source
        self.extra_args = extra_args

    def on_mount(self, event) -> None:
        event.prevent_default()
        self.push_screen(SweepScreen(self.sweep_source, extra_args=self.extra_args))


async def shows(pilot, *words: str) -> str:
    """The screen's text once every word is painted on it (painting lags the widgets a little)."""
    await wait_until(pilot, lambda: all(word in screen_text(pilot.app) for word in words))
    return screen_text(pilot.app)


async def settled(pilot) -> SweepScreen:
    screen = pilot.app.screen
    await wait_until(pilot, lambda: (screen.result or screen.error) and not screen.has_class("-running"), 120)
    return screen


async def test_opening_a_sweep_json_shows_the_heatmap(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(SWEEP))
    app = SweepApp(tmp_path / "runs", str(path))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await settled(pilot)
        assert screen.error is None and screen.result["depth"] == 5
        text = await shows(pilot, "speed-up 1.34×", "Run sweep", "Open", "Back")
        assert "builtin:tiny-neo on builtin:pydoc: 4 → 5 layers, 6 mappings" in text
        rows = [line for line in text.splitlines() if "│" in line]
        assert "ref" in rows[2] and "248.754" in rows[0] and "252.364" in rows[-1]  # best first, worst last


async def test_opening_a_run_by_id_reads_its_results_sweep(tmp_path):
    root = tmp_path / "runs"
    run = make_run(root, "20240301-100000-mapping-aaaa", name="mapping-sweep")
    run.results_json.write_text(json.dumps({"state": "done", "matrix": {}, "sweep": SWEEP}))
    app = SweepApp(root)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = pilot.app.screen
        screen.query_one("#sweep-open").value = "mapping-sweep"  # a run name resolves like the CLI's
        await pilot.press("ctrl+o")
        screen = await settled(pilot)
        assert screen.error is None and len(screen.result["rows"]) == 7


def test_sources_without_a_sweep_say_so_in_one_line(tmp_path):
    root = tmp_path / "runs"
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "other.json").write_text('{"a": 1}')
    run = make_run(root, "20240301-100000-plain-bbbb")
    run.results_json.write_text('{"state": "done", "matrix": {}}')  # a run whose plan had no [sweep]
    unfinished = make_run(root, "20240301-110000-busy-cccc", "running", pid=os.getpid())
    cases = [(str(tmp_path / "absent.json"), "is neither a file nor a run"),
             (str(tmp_path / "bad.json"), "not readable JSON"),
             (str(tmp_path / "other.json"), "not a mapping sweep"),
             (run.id, "has no mapping sweep"),
             (unfinished.id, "has no results.json yet"),
             ("", "give a sweep .json file")]
    for source, expected in cases:
        with pytest.raises(SweepSourceError) as caught:
            load_sweep(source, root)
        assert expected in str(caught.value) and "\n" not in str(caught.value), source


async def test_a_bad_source_is_one_error_line_on_screen(tmp_path):
    app = SweepApp(tmp_path / "runs", str(tmp_path / "absent.json"))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await settled(pilot)
        assert screen.result is None and "is neither a file nor a run" in screen.error
        await shows(pilot, "error: ")


def test_the_command_is_the_cli_in_a_subprocess():
    args = sweep_command("builtin:tiny-neo", 8, False, "builtin:pydoc", 5)
    assert args[1:5] == ["-m", "widen_tui.cli", "sweep", "mapping"]
    assert "--no-keep-ends" in args and args[args.index("--limit") + 1] == "5" and "--json" in args


async def test_running_a_sweep_on_a_local_model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny model: threads only contend
    save_byte_level_neo(tmp_path / "neo")
    app = SweepApp(tmp_path / "runs", extra_args=SMALL)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = pilot.app.screen
        screen.query_one("#sweep-model").value = str(tmp_path / "neo")
        screen.query_one("#sweep-depth").value = "4"
        screen.query_one("#sweep-limit").value = "3"
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert screen.has_class("-running") and screen.query_one("#sweep-loading").display
        screen = await settled(pilot)
        assert screen.error is None, screen.error
        result = screen.result
        assert result["depth"] == 4 and result["source_layers"] == 4 and len(result["rows"]) == 1 + 3
        reference = next(r for r in result["rows"] if r["reference"])
        identity = next(r for r in result["rows"] if r["mapping"] == [0, 1, 2, 3])
        assert identity["ppl"] == pytest.approx(reference["ppl"], rel=1e-6)
        await shows(pilot, "speed-up")
        assert not screen.query_one("#sweep-loading").display


async def test_a_failing_sweep_shows_the_clis_error_line(tmp_path):
    app = SweepApp(tmp_path / "runs", extra_args=SMALL)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = pilot.app.screen
        screen.query_one("#sweep-model").value = "builtin:tiny-neo"
        screen.query_one("#sweep-depth").value = "4"
        screen.query_one("#sweep-task").value = str(tmp_path / "no-such-corpus.txt")
        await pilot.press("ctrl+r")
        screen = await settled(pilot)
        assert screen.result is None and screen.error and "\n" not in screen.error
        assert "Traceback" not in screen.error


async def test_bad_inputs_are_refused_before_any_subprocess(tmp_path):
    app = SweepApp(tmp_path / "runs")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = pilot.app.screen
        screen.query_one("#sweep-depth").value = ""
        await pilot.press("ctrl+r")
        assert screen.error.startswith("depth:") and not screen.has_class("-running")


def test_sweep_screen_snapshot(tmp_path, snap_compare, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path: the same text in the "open" box on every machine
    Path("sweep.json").write_text(json.dumps(SWEEP))
    app = SweepApp(tmp_path / "runs", "sweep.json")

    async def settle(pilot):
        await settled(pilot)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=settle)
    assert os.path.exists("sweep.json")
