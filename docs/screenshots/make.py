"""Regenerate the README's TUI screenshots (SVG, through Textual's own screenshot export).

    WIDEN_HOME=runs .venv/bin/python docs/screenshots/make.py

Needs finished runs in the runs root: run `widen run experiments/compare_strategies.toml` first.
Writes docs/screenshots/{runs,monitor,compare,builder}.svg at 100×32.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from engine.runs.rundir import list_run_dirs, runs_root
from widen_tui.tui.app import WidenApp

HERE = Path(__file__).resolve().parent
EXPERIMENTS = HERE.parents[1] / "experiments"
SIZE = (100, 32)


async def shoot(name: str, open_screen, keys: tuple[str, ...] = (), settle: float = 3.0) -> None:
    app = WidenApp(runs_root())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(1.0)
        if open_screen:
            open_screen(app)
        await pilot.pause(settle)
        for key in keys:
            await pilot.press(key)
            await pilot.pause(1.0)
        app.save_screenshot(str(HERE / f"{name}.svg"))
    print(f"wrote {HERE / f'{name}.svg'}")


def main() -> None:
    runs = [r for r in list_run_dirs() if r.status()["state"] == "done"]
    if len(runs) < 2:
        sys.exit(f"need two finished runs in {runs_root()} — run experiments/compare_strategies.toml first")
    grown = [r for r in runs if (r.results() or {}).get("expansions")] or runs
    asyncio.run(shoot("runs", None))
    asyncio.run(shoot("monitor", lambda app: app.open_monitor(grown[0].id)))
    asyncio.run(shoot("compare", lambda app: app.open_compare([r.id for r in runs[:4]])))
    asyncio.run(shoot("builder", lambda app: app.open_builder(EXPERIMENTS / "compare_strategies.toml"),
                      keys=("f4", "f8", "f8", "f8", "f8", "f8", "f8")))  # the Stages tab, the widening+lora variant


if __name__ == "__main__":
    main()
