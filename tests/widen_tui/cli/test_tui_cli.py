"""A run started from the CLI shows up in the TUI; quitting the TUI (`q`) leaves it running to the end."""

from __future__ import annotations

import pytest

from engine.runs.rundir import RunDir
from tests.conftest import wait_for, widen
from tests.widen_tui.tui.test_tui_runs import wait_until
from widen_tui.tui.app import WidenApp
from widen_tui.tui.screens.runs import RunsScreen
from widen_tui.tui.widgets.runs_table import RunsTable

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_tui_sees_a_cli_run_and_quitting_leaves_it_running(tiny_plan, widen_home):
    # long enough (a few seconds) that the run is still training when the TUI quits
    run_id = widen("run", str(tiny_plan), "--detach", "--set", "stages.1.steps=60", env_home=widen_home,
                   check=True).stdout.strip()
    run = RunDir(widen_home / run_id)

    app = WidenApp(widen_home)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.loaded)
        table = app.screen.query_one(RunsTable)
        assert table.shown_ids == [run_id]
        # the table follows the run live (a refresh every 2 s) until it trains
        await wait_until(pilot, lambda: str(table.get_cell(run_id, "state")) == "running", timeout=60)
        await pilot.press("q")
    assert app.return_code == 0  # the app has quit…

    assert wait_for(run, ("done", "failed", "lost")) == "done", run.stderr.read_text()[-2000:]  # …the run has not
    assert run.results()["summary"]["final_ppl"]
