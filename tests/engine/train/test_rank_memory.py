"""Per-rank memory: engine.train.system.rank_memory (RSS, and the GPU NVML sees for this rank's own
device), the `ranks` event of a distributed run (schema: a bad line is skipped, never a crash),
and where it shows: `widen watch` (report.live_view), `widen logs` (event_text) and the monitor's
System tab — on a single-process run none of them changes."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from textual.widgets import RichLog, Static

from engine.runs.events import EventReader
from engine.runs.progress import RunProgress
from engine.runs.records import EventError, RankRow, RanksEvent, StartEvent, StepEvent, parse_event
from engine.train import system
from tests.widen_tui.tui.test_tui_monitor import MonitorApp, wait_until, write_run
from tests.widen_tui.views.test_plot import fake_events, fake_results
from widen_tui.views.event_text import describe_event
from widen_tui.views.report import live_view, rank_lines

GB = 1024.0  # MB


def ranks_event(step: int, rows: list[tuple], stage: int = 0, global_step: int | None = None) -> dict:
    """A `ranks` line as written (``parse_event`` makes it a record); rows: (rank, rss_mb, gpu_mem_mb[, host])."""
    return {"type": "ranks", "t": 1000.0 + step, "stage": stage, "step": step,
            "global_step": step if global_step is None else global_step,
            "ranks": [{"rank": r[0], "host": r[3] if len(r) > 3 else None, "rss_mb": r[1], "gpu_mem_mb": r[2]}
                      for r in rows]}


def distributed_events(gpu: bool = True) -> list:
    """A two-process run's events: the start says world_size 2; a `ranks` event after every
    fifth step, memory growing with the step."""
    out = []
    for e in fake_events():
        if isinstance(e, StartEvent):
            e = e.model_copy(update={"world_size": 2})
        out.append(e)
        if isinstance(e, StepEvent) and e.step % 5 == 0:
            g = e.global_step
            ranks = ranks_event(e.step, [(0, 800.0 + g, 10.0 * GB + g if gpu else None),
                                         (1, 790.0 + g, 10.1 * GB + g if gpu else None)], stage=e.stage, global_step=g)
            out.append(parse_event({**ranks, "t": e.t}))
    return out


def watch_text(events: list) -> str:
    progress = RunProgress()
    for e in events:
        progress.update(e)
    console = Console(width=120, record=True)
    console.print(live_view(progress))
    return console.export_text()


# ---------------------------------------------------------------------------------------------
# rank_memory


def test_rank_memory_on_the_cpu():
    rss, gpu = system.rank_memory(torch.device("cpu"))
    assert system.RANK_MEMORY_FIELDS == ("rss_mb", "gpu_mem_mb")
    assert isinstance(rss, float) and rss > 0 and gpu == -1.0
    assert all(isinstance(v, float) for v in system.rank_memory(torch.device("cpu")))  # what all_gather carries


class FakeNvml:
    """pynvml with four GPUs, known by PCI bus id; NVML's own order is not CUDA's."""

    used_mb = {"00000000:1a:00.0": 1000.0, "00000000:3d:00.0": 2000.0, "00000000:b3:00.0": 3000.0,
               "00000000:db:00.0": 4000.0}

    def __init__(self, fail_init: bool = False):
        self.fail_init, self.inits, self.lookups = fail_init, 0, []

    def nvmlInit(self):
        self.inits += 1
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        self.lookups.append(bus_id)
        if bus_id not in self.used_mb:
            raise RuntimeError("Not Found")
        return bus_id

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=int(self.used_mb[handle] * 2**20), total=int(80 * GB * 2**20))


@pytest.fixture
def fake_gpus(monkeypatch):
    """CUDA_VISIBLE_DEVICES=2,0 as torch sees it: cuda:0 is the GPU at bus b3, cuda:1 at 1a."""
    nvml = FakeNvml()
    monkeypatch.setitem(__import__("sys").modules, "pynvml", nvml)
    monkeypatch.setattr(system, "_NVML_CACHE", {})
    buses = {0: 0xB3, 1: 0x1A, 2: 0x77}  # cuda:2 is on a bus NVML does not know
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(pci_domain_id=0, pci_bus_id=buses[i], pci_device_id=0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    return nvml


def test_rank_memory_finds_its_own_gpu_by_pci_bus_id(fake_gpus):
    cuda = lambda index: SimpleNamespace(type="cuda", index=index)  # noqa: E731 - a stand-in torch.device
    assert system.rank_memory(cuda(0))[1] == 3000.0   # NVML's third GPU, not its first
    assert system.rank_memory(cuda(1))[1] == 1000.0
    assert system.rank_memory(cuda(None))[1] == 1000.0  # "cuda": the current device
    assert system.rank_memory(cuda(2))[1] == -1.0      # NVML cannot see it: no figure, no error
    for _ in range(3):
        system.rank_memory(cuda(0))
    # NVML is started once and each device looked up once: cheap at every logged step
    assert fake_gpus.inits == 1 and fake_gpus.lookups == ["00000000:b3:00.0", "00000000:1a:00.0",
                                                          "00000000:77:00.0"]
    assert system.rank_memory(torch.device("cpu"))[1] == -1.0


def test_rank_memory_without_nvml(monkeypatch, fake_gpus):
    monkeypatch.setitem(__import__("sys").modules, "pynvml", FakeNvml(fail_init=True))
    rss, gpu = system.rank_memory(SimpleNamespace(type="cuda", index=0))
    assert rss > 0 and gpu == -1.0


# ---------------------------------------------------------------------------------------------
# the event


def test_the_ranks_event_schema(tmp_path):
    good = ranks_event(4, [(0, 812.0, 10444.0), (1, 790.5, None, "node1")])
    assert isinstance(parse_event(good), RanksEvent)
    assert parse_event({**good, "ranks": [{"rank": 0}]}).ranks[0].rss_mb is None  # figures may be missing
    bad = {
        "no ranks": {k: v for k, v in good.items() if k != "ranks"},
        "ranks is an object": {**good, "ranks": {"0": {}}},
        "empty": {**good, "ranks": []},
        "not an object": {**good, "ranks": [812.0]},
        "no rank": {**good, "ranks": [{"rss_mb": 1.0}]},
        "rank is a string": {**good, "ranks": [{"rank": "0"}]},
        "rank is a bool": {**good, "ranks": [{"rank": True}]},
        "negative": {**good, "ranks": [{"rank": -1}]},
        "repeated": {**good, "ranks": [{"rank": 0}, {"rank": 0}]},
        "rss is text": {**good, "ranks": [{"rank": 0, "rss_mb": "812 MB"}]},
        "host is a number": {**good, "ranks": [{"rank": 0, "host": 7}]},
    }
    for why, event in bad.items():
        with pytest.raises(EventError):
            parse_event(event)
            pytest.fail(why)
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in [good, *bad.values(), good]))
    reader = EventReader(path)
    assert [e.to_json() for e in reader.read_new()] == [good, good]
    assert reader.problem_count == len(bad)
    assert "line 6: ranks event: ranks[0] lacks rank" in reader.problems[4]
    assert "ranks[1].rank 0 is repeated" in reader.problems[8]


def test_logs_line():
    line = describe_event(parse_event(ranks_event(4, [(0, 812.0, 10444.0), (1, 790.0, None)], stage=1)))
    assert line == "stage 2 step 4: memory per rank: rank 0 rss 812 MB gpu 10.2 GB; rank 1 rss 790 MB gpu –"
    cpu = describe_event(parse_event(ranks_event(4, [(0, 812.0, None, "node0"), (1, 1500.0, None, "node1")])))
    assert cpu == "stage 1 step 4: memory per rank: rank 0 (node0) rss 812 MB; rank 1 (node1) rss 1.5 GB"


# ---------------------------------------------------------------------------------------------
# widen watch


def test_progress_keeps_the_latest_ranks_and_a_resume_forgets_them():
    progress = RunProgress()
    for e in distributed_events():
        progress.update(e)
    assert progress.world_size == 2 and [r.rank for r in progress.ranks] == [0, 1]
    assert progress.ranks_at == (1, 20) and progress.ranks[0].rss_mb == 840.0
    progress.update(parse_event(ranks_event(21, [(1, 1.0, None), (0, 2.0, None)], stage=1, global_step=41)))
    assert [r.rank for r in progress.ranks] == [0, 1]  # by rank, however gathered
    progress.update(parse_event({"type": "resume", "t": 2000.0, "stage": 1, "step": 10, "global_step": 30}))
    assert progress.ranks == [] and progress.ranks_at is None


def test_watch_shows_one_line_per_rank():
    text = watch_text(distributed_events())
    assert "cpu × 2 processes" in text
    lines = [" ".join(line.strip("│ ").split()) for line in text.splitlines() if "rank " in line]
    assert lines == ["rank 0 rss 840 MB gpu 10.0 GB", "rank 1 rss 830 MB gpu 10.1 GB"]


def test_watch_on_cpus_shows_no_gpu_column_and_hosts_when_gathered():
    events = distributed_events(gpu=False)
    events.append(parse_event(ranks_event(20, [(0, 900.0, None, "node0"), (1, 910.0, None, "node1")], stage=1,
                                          global_step=40)))
    lines = [" ".join(line.strip("│ ").split()) for line in watch_text(events).splitlines() if "rank " in line]
    assert lines == ["rank 0 (node0) rss 900 MB", "rank 1 (node1) rss 910 MB"]


def test_a_single_process_run_shows_no_ranks():
    text = watch_text(fake_events())
    assert "rank " not in text and "processes" not in text


def test_a_big_world_is_summed_up_past_the_first_ranks():
    ranks = [RankRow(rank=r, host=None, rss_mb=800.0 + r, gpu_mem_mb=9 * GB + r) for r in range(64)]
    lines = rank_lines(ranks)
    assert len(lines) == 17 and lines[0] == "rank 0   rss  800 MB  gpu  9.0 GB"
    assert lines[-1] == "… 48 more ranks: rss up to 863 MB, gpu up to 9.1 GB"


# ---------------------------------------------------------------------------------------------
# the monitor


def system_tab_texts(root, run_id: str, size=(100, 30)) -> tuple[bool, str, str]:
    """(whether the ranks panel shows, its text, the log's text) on the monitor's System tab."""
    out = {}

    async def main():
        app = MonitorApp(root, run_id, clock=lambda: 2000.0)
        async with app.run_test(size=size) as pilot:
            screen = app.screen
            await wait_until(pilot, lambda: screen.loaded, what="history")
            await pilot.press("4")
            await pilot.pause(0.2)
            panel = screen.query_one("#ranks-panel", Static)
            out["shown"] = panel.display and panel.region.height > 0
            out["panel"] = ""
            if panel.display:
                console = Console(width=size[0], record=True)
                console.print(panel.content)
                out["panel"] = console.export_text()
            log = screen.query_one("#event-log", RichLog)
            out["log"] = "\n".join(line.text for line in log.lines)

    asyncio.run(main())
    return out["shown"], out["panel"], out["log"]


def test_the_monitor_shows_each_rank_on_the_system_tab(widen_home):
    events = distributed_events()
    run = write_run(widen_home, "20250101-000000-ddp-rrrr", events)
    shown, panel, log = system_tab_texts(widen_home, run.id)
    assert shown
    lines = [" ".join(line.split()) for line in panel.splitlines() if line.strip()]
    assert lines[0] == "2 processes · stage 2 step 20 RSS GPU memory"
    assert lines[1:] == ["rank 0 840 MB 10.0 GB", "rank 1 830 MB 10.1 GB"]
    assert "memory per rank" not in log  # samples, not progress: the System tab has them


def test_the_monitor_of_a_run_on_cpus_says_no_gpu_per_rank(widen_home):
    run = write_run(widen_home, "20250101-000000-ddp-cccc", distributed_events(gpu=False))
    shown, panel, _ = system_tab_texts(widen_home, run.id)
    assert shown and "rank 1" in panel and panel.count("no GPU") == 2


def test_the_monitor_of_a_single_process_run_has_no_ranks_panel(widen_home):
    run = write_run(widen_home, "20250101-000000-one-oooo", fake_events())
    shown, panel, _ = system_tab_texts(widen_home, run.id)
    assert not shown and panel == ""


def test_snapshot_monitor_system_with_four_ranks(snap_compare, tmp_path):
    """The System tab of a run on 4 GPUs: the single-process snapshot's rows, then one per rank."""
    from tests.widen_tui.tui.test_tui_monitor import SNAPSHOT_RUN, settle, snapshot_events

    events = snapshot_events()
    events[0] = events[0].model_copy(update={"world_size": 4, "device": "cuda"})
    events.insert(-1, parse_event(ranks_event(20, [(r, 2210.4 + 10 * r, 20480.0 + 512 * r) for r in range(4)], stage=1,
                                              global_step=40)))
    write_run(tmp_path / "runs", SNAPSHOT_RUN, events, results=fake_results(events))

    async def system_tab(pilot):
        await settle(pilot)
        await pilot.press("4")
        await pilot.pause(0.2)

    app = MonitorApp(tmp_path / "runs", SNAPSHOT_RUN, clock=lambda: 2000.0)
    assert snap_compare(app, terminal_size=(100, 30), run_before=system_tab)
