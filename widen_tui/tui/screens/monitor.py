"""Run monitor: one run, live — whoever started it, wherever it runs (a shared runs root works).

A thread worker follows the run directory (``engine.runs.follow.Follower``): the history is read
once, then only the bytes appended to ``events.jsonl`` since the last read, plus ``status.json``
for the effective state (``lost`` when the worker died without a final status). It posts a
``RunUpdate`` message when something changed; the UI thread folds the records
(``widen_tui.views.live_run.LiveRun``) and redraws at most twice a second, the chart only when a
curve moved. A finished run is polled slowly, so watching it costs next to nothing.

Layout (usable at 80×24): a summary on top (state; while no step comes — loading, tokenizing,
evaluating — one line saying what the worker is busy with and for how long; progress bars with
ETA for the stage and the whole run, loss, tokens/s, a one-line system summary), then tabs: Loss
chart · Forgetting · Expansions · System · Log, and Experts (a mixture of experts' routing: shown
once the run writes its first `experts` event).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar, RichLog, Static, TabbedContent, TabPane
from textual.worker import get_current_worker

from engine.runs.curves import X_AXES, is_number
from engine.runs.follow import Follower
from engine.runs.progress import RunProgress
from engine.runs.records import EventRecord, SystemEvent
from engine.runs.rundir import LIVE_STATES, RUNNING_STATES, RunDir
from widen_tui.tui.widgets.binding_commands import BindingCommands
from widen_tui.tui.widgets.confirm import ConfirmScreen
from widen_tui.tui.widgets.experts_heat import ExpertsHeat
from widen_tui.tui.widgets.loss_chart import LossChart
from widen_tui.views.activity import activity_line
from widen_tui.views.experts import experts_view
from widen_tui.views.live_run import LiveRun
from widen_tui.views.report import STATE_STYLE, fmt_duration, fmt_num, rank_overflow, rank_rows

POLL_S = 0.5            # a running run: look for new bytes this often
IDLE_POLL_S = 2.0       # a finished (or lost) run: it only changes if someone resumes it
HEARTBEAT_S = 5.0       # a quiet running run still refreshes "last event … ago"
REDRAW_MIN_S = 0.5      # at most two redraws a second, however fast events arrive
CHART_COST_SHARE = 0.05  # a long history redraws the chart less often: at most ~5% of a core on it
LOG_HISTORY_LINES = 400  # the log shows the tail of a long history (`widen logs` has it all)
RANK_ROWS = 32          # the System tab lists this many ranks, then one line for the rest

FORGETTING_NOTE = ("bits per byte per task after each stage (lower = better) · forgetting = final − best "
                   "earlier value since the task was trained: positive = worse retention")

Clock = Callable[[], float]
_UNDRAWN = object()  # a panel not drawn yet


# ---------------------------------------------------------------------------------------------
# messages


class RunUpdate(Message):
    """What the follower read since its last message (posted from its thread)."""

    def __init__(self, events: list[EventRecord], status: dict, results: dict | None, info: dict | None,
                 now: float, first: bool, problems: list[str] | None = None):
        super().__init__()
        self.events, self.status, self.results, self.info = events, status, results, info
        self.now, self.first = now, first
        self.problems = problems or []  # unreadable run files, skipped lines of events.jsonl


# ---------------------------------------------------------------------------------------------
# the screen


class MonitorScreen(Screen):
    """Follows run `run_id` in the app's runs root. `clock` is injectable (tests, snapshots)."""

    CSS_PATH = "monitor.tcss"
    COMMANDS = {BindingCommands}
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("c", "cancel_run", "Cancel run"),
        Binding("s", "x_axis('steps')", "Steps"),
        Binding("t", "x_axis('tokens')", "Tokens"),
        Binding("f", "x_axis('flops')", "FLOPs"),
        Binding("p", "write_figures", "PNG figures"),
        Binding("1", "tab('loss')", "Loss chart", show=False),
        Binding("2", "tab('forgetting')", "Forgetting", show=False),
        Binding("3", "tab('expansions')", "Expansions", show=False),
        Binding("4", "tab('system')", "System", show=False),
        Binding("5", "tab('log')", "Log", show=False),
        Binding("6", "tab('experts')", "Experts", show=False),
    ]

    def __init__(self, run_id: str, clock: Clock = time.time, root: Path | str | None = None):
        super().__init__()
        self.run_id = run_id
        self._root = Path(root) if root else None
        self.clock = clock
        self.live = LiveRun(run_id)
        self.x_axis = "steps"
        self.loaded = False           # the history has been read and shown
        self.has_experts = False      # the Experts tab is shown (a mixture of experts reported its routing)
        self.redraws = 0              # how many times the panels were redrawn (tests, benchmarks)
        self.chart_updates = 0        # how many times the chart was given new curves
        self._now = clock()
        self._wake = threading.Event()
        self._stopping = False
        self._last_redraw = 0.0
        self._last_chart = 0.0
        self._redraw_timer = None
        self._pending_log: list[str] = []
        # what each panel last showed (the system panel also shows that there is no sample yet)
        self._drawn = {"chart": None, "matrix": None, "expansions": None, "system": _UNDRAWN, "ranks": None,
                       "experts": None}

    @property
    def run(self) -> RunDir:
        """The run directory (UI thread: it asks the app for the runs root)."""
        root = self._root or Path(getattr(self.app, "root", "runs"))
        return RunDir(root / self.run_id)

    # -- layout -------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="summary"):
            yield Static(id="headline")
            yield Static(id="activity")  # shown only while the worker reports a phase (progress events)
            with Horizontal(classes="bar-row"):
                yield Label("stage", id="stage-label", classes="bar-label")
                yield ProgressBar(total=1, show_eta=False, id="stage-bar")
                yield Static(id="stage-eta", classes="bar-note")
            with Horizontal(classes="bar-row"):
                yield Label("overall", classes="bar-label")
                yield ProgressBar(total=1, show_eta=False, id="overall-bar")
                yield Static(id="overall-eta", classes="bar-note")
            yield Static(id="vitals")
        with TabbedContent(id="tabs", initial="loss"):
            with TabPane("Loss", id="loss"):
                yield LossChart(id="chart")
            with TabPane("Forgetting", id="forgetting"):
                yield Static(FORGETTING_NOTE, id="forgetting-note", classes="note")
                yield DataTable(id="forgetting-table", zebra_stripes=True, cursor_type="row")
                yield Static(id="continual", classes="note")
            with TabPane("Expansions", id="expansions"):
                yield DataTable(id="expansion-table", zebra_stripes=True, cursor_type="row")
                yield Static("◆ operators applied at a stage start · ▲ a growth mid-stage (its trigger in the table) · "
                             "Δlogits and losses measured on a fixed probe batch", classes="note")
            with TabPane("System", id="system"):
                yield Static(id="system-panel")
                yield Static(id="ranks-panel")  # shown for a run on several processes
            with TabPane("Log", id="log"):
                yield RichLog(id="event-log", max_lines=2000, wrap=False, markup=False, highlight=False)
            with TabPane("Experts", id="experts"):  # hidden until a mixture of experts reports its routing
                yield ExpertsHeat(id="experts-heat")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.run_id
        self.query_one("#headline", Static).update(Text(f"{self.run_id} · reading the run…"))
        self.query_one("#chart", LossChart).show([], self.x_axis, title=self._chart_title())
        self.query_one("#tabs", TabbedContent).hide_tab("experts")
        self._rundir = self.run
        self._follow(self._rundir)

    def on_unmount(self) -> None:
        self._stopping = True
        self._wake.set()  # the follower thread sleeps on this: wake it to see it must stop

    # -- following the run (thread) -----------------------------------------------------------------
    @work(thread=True, exclusive=True, group="follow")
    def _follow(self, run: RunDir) -> None:
        worker = get_current_worker()
        follower = Follower(run)
        info = run.info()
        last_post = 0.0
        first = True
        while not (worker.is_cancelled or self._stopping):
            update = follower.poll()
            problems = [f"warning: {p} — skipped" for p in update.skipped]
            problems += [f"warning: {p}" for p in update.file_problems]
            now = self.clock()
            running = update.state in RUNNING_STATES
            if first or update.records or update.results or problems or update.status is not None \
                    or (running and now - last_post >= HEARTBEAT_S):
                self.post_message(RunUpdate(update.records, follower.status, update.results, info if first else None,
                                            now, first, problems))
                last_post, first = now, False
            if self._wake.wait(POLL_S if running or update.records else IDLE_POLL_S) and not self._stopping:
                self._wake.clear()  # woken early (after a cancel): look now, then sleep as before

    def on_run_update(self, message: RunUpdate) -> None:
        before = self.live.state
        lines = self.live.fold(message.events, message.status, message.results, message.info) + message.problems
        if message.first:
            skipped = max(len(lines) - LOG_HISTORY_LINES, 0)
            if skipped:
                lines = [f"… {skipped} earlier lines: `widen logs {self.run_id}` has them all"] + lines[skipped:]
        self._pending_log += lines
        self._now = message.now
        if self.live.state != before:
            self.refresh_bindings()  # cancel is only offered while the run can be cancelled
        if message.first:
            self._redraw(force_chart=True)  # the history shows at once
            self.loaded = True
        else:
            self._schedule_redraw()

    def _schedule_redraw(self) -> None:
        if self._redraw_timer is not None:
            return  # one is coming: it will show this too
        wait = self._last_redraw + REDRAW_MIN_S - time.monotonic()
        if wait <= 0:
            self._redraw()
        else:
            self._redraw_timer = self.set_timer(wait, self._redraw)

    # -- drawing --------------------------------------------------------------------------------------
    def _redraw(self, force_chart: bool = False) -> None:
        self._redraw_timer = None
        self._last_redraw = time.monotonic()
        self.redraws += 1
        live = self.live
        self._draw_summary()
        chart = self.query_one("#chart", LossChart)
        chart_key = (live.curves.version, self.x_axis, live.label)
        if chart_key != self._drawn["chart"]:
            gap = max(REDRAW_MIN_S, chart.last_build_s / CHART_COST_SHARE)
            wait = self._last_chart + gap - time.monotonic()
            if wait <= 0 or force_chart:
                self._drawn["chart"] = chart_key
                self._last_chart = time.monotonic()
                self.chart_updates += 1
                chart.show([live.curves.curves()], self.x_axis, title=self._chart_title())
            elif self._redraw_timer is None:
                self._redraw_timer = self.set_timer(wait, self._redraw)  # the chart catches up then
        if live.matrix_version != self._drawn["matrix"]:
            self._drawn["matrix"] = live.matrix_version
            self._draw_forgetting()
        if live.curves.expand_events != self._drawn["expansions"]:
            self._drawn["expansions"] = live.curves.expand_events
            self._draw_expansions()
        system = live.progress.system
        if system is not self._drawn["system"]:
            self._drawn["system"] = system
            self.query_one("#system-panel", Static).update(system_view(system, live.progress))
        experts = live.progress.experts
        if experts is not self._drawn["experts"]:
            self._drawn["experts"] = experts
            self._draw_experts(experts)
        ranks = live.progress.ranks
        if ranks is not self._drawn["ranks"]:
            self._drawn["ranks"] = ranks
            panel = self.query_one("#ranks-panel", Static)
            panel.set_class(bool(ranks), "-has-ranks")
            if ranks:
                panel.update(ranks_view(live.progress))
        if self._pending_log:
            log = self.query_one("#event-log", RichLog)
            for line in self._pending_log:
                log.write(line)
            self._pending_log = []

    def _chart_title(self) -> str:
        return f"loss vs {X_AXES[self.x_axis]} · {self.live.label}"

    def _draw_summary(self) -> None:
        live, p = self.live, self.live.progress
        state = live.state
        head = Text()
        head.append(self.run_id, style="bold")
        if live.info.get("name"):
            head.append(f" · {live.info['name']}")
        head.append("  ")
        head.append(f" {state} ", style=f"bold reverse {STATE_STYLE.get(state, '')}")
        if p.device:
            head.append(f"  device {p.device}" + (f" × {p.world_size} processes" if p.world_size > 1 else ""))
        if state == "lost":
            head.append(f"  the worker (pid {live.status.get('pid')}) is gone without a final status — "
                        f"`widen resume {self.run_id}`", style="red")
        elif state == "stale":
            head.append(f"  the worker (pid {live.status.get('pid')}) is stopped or has not written a "
                        "heartbeat for a while", style="yellow")
        elif state in ("failed", "diverged") and (live.status.get("error") or p.error):
            head.append(f"  {live.status.get('error') or p.error}", style="red")
        self.query_one("#headline", Static).update(head)
        activity = activity_line(p, self._now, state)
        panel = self.query_one("#activity", Static)
        panel.set_class(activity is not None, "-active")
        if activity:
            panel.update(Text(f"▸ {activity}"))

        n_stages = len(p.stage_steps)
        stage_total = p.stage_steps[p.stage] if p.stage < n_stages else 0
        finished = state == "done"
        self.query_one("#stage-label", Label).update(f"stage {p.stage + 1}/{n_stages or '?'}")
        self.query_one("#stage-bar", ProgressBar).update(total=max(stage_total, 1),
                                                         progress=stage_total if finished else p.step)
        running = state in RUNNING_STATES
        stage_eta = fmt_duration(p.stage_eta_s()) if running else "–"
        self.query_one("#stage-eta", Static).update(
            f"{p.step}/{stage_total} · ETA {stage_eta} · {p.stage_name or '–'} ({p.task or '–'})")
        total = p.total_steps
        self.query_one("#overall-bar", ProgressBar).update(total=max(total, 1),
                                                           progress=total if finished else p.global_step)
        overall_eta = fmt_duration(p.eta_s()) if running else "–"
        self.query_one("#overall-eta", Static).update(f"{p.global_step}/{total} steps · ETA {overall_eta}")

        # a finished run's elapsed time is its own (first to last event), not the clock's
        end = self._now if running else (p.last_t or self._now)
        vitals = Text(no_wrap=True, overflow="ellipsis")  # two lines, never wrapped into a third
        vitals.append(f"loss {fmt_num(p.loss, 4)} · {fmt_num(p.tokens_per_s and round(p.tokens_per_s))} tok/s · "
                      f"{fmt_num(p.tokens)} tokens · elapsed {fmt_duration(p.elapsed_s(end))}")
        if running and p.last_t:
            vitals.append(f" · last event {fmt_duration(max(self._now - p.last_t, 0))} ago", style="dim")
        vitals.append("\n")
        vitals.append_text(system_line(p.system))
        self.query_one("#vitals", Static).update(vitals)

    def _draw_forgetting(self) -> None:
        table = self.query_one("#forgetting-table", DataTable)
        table.clear(columns=True)
        view = self.live.forgetting()
        continual = self.query_one("#continual", Static)
        if view is None:
            table.add_column("task")
            continual.update("no evaluation yet: rows fill in as each stage ends")
            return
        metric = "bits/byte" if view.metric == "bpb" else "loss"
        table.add_column("task", key="task")
        for i, label in enumerate(view.rows):
            table.add_column(label, key=f"row{i}")
        table.add_column(f"forgetting ({metric})", key="forgetting")
        for j, task in enumerate(view.tasks):
            cells: list = [task]
            for i in range(len(view.rows)):
                value = view.values[i][j]
                text = Text(fmt_num(value, 4), justify="right")
                if view.trained[i] == task:
                    text.stylize("bold underline")  # the stage that trained this task
                cells.append(text)
            f = view.forgetting.get(task)
            style = "red" if is_number(f) and f > 0 else "green" if is_number(f) else ""
            cells.append(Text("–" if f is None else f"{f:+.4f}", style=style, justify="right"))
            table.add_row(*cells, key=task)
        c = view.continual
        extra = (f" · ACC {fmt_num(c.get('acc'), 4)} · BWT {fmt_num(c.get('bwt'), 4)} · FWT "
                 f"{fmt_num(c.get('fwt'), 4)} (BWT/FWT: positive = better)" if c else "")
        continual.update(f"from {view.source}; underlined: the stage that trained the task{extra}")

    def _draw_expansions(self) -> None:
        table = self.query_one("#expansion-table", DataTable)
        table.clear(columns=True)
        for name in ("stage", "op", "added", "max|Δlogits|", "loss before→after", "when"):
            table.add_column(name, key=name)
        for k, row in enumerate(self.live.expansion_rows()):
            e = row.event
            before, after = e.loss_before, e.loss_after
            loss = f"{before:.4f}→{after:.4f}" if is_number(before) and is_number(after) else "–"
            delta = e.max_abs_logit_delta
            if row.growth:
                growth = e.growth  # 0-based in the events, as `widen logs` counts: from 1
                step = "?" if e.step is None else e.step
                trigger = f" ({e.trigger})" if e.trigger else ""
                when = f"▲ growth {growth + 1 if growth is not None else '?'}{trigger} · step {step}"
            else:
                when = "◆ stage start"
            table.add_row(str(e.stage + 1), e.op, fmt_num(e.params_added),
                          f"{delta:.2e}" if is_number(delta) else "–", loss, when, key=str(k))

    def _draw_experts(self, experts) -> None:
        """The Experts tab: shown from a mixture of experts' first routing window on (a resume may
        void the window shown; the tab then waits for the next)."""
        if experts is not None and not self.has_experts:
            self.has_experts = True
            self.query_one("#tabs", TabbedContent).show_tab("experts")
        self.query_one("#experts-heat", ExpertsHeat).show(experts_view(experts))

    # -- actions --------------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "cancel_run":
            return True if self.live.state in LIVE_STATES else None  # None: shown, greyed out
        if action == "tab" and parameters == ("experts",):
            return self.has_experts or None
        return True

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = tab

    def action_x_axis(self, axis: str) -> None:
        self.x_axis = axis
        self.query_one("#tabs", TabbedContent).active = "loss"
        self._redraw(force_chart=True)
        note = self.query_one("#chart", LossChart).note
        if note:
            self.notify(note, severity="warning")

    def action_cancel_run(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._cancel()

        self.app.push_screen(ConfirmScreen(f"Cancel run {self.run_id}?",
                                           "It saves a checkpoint and stops; `widen resume` continues it later.",
                                           yes="Cancel the run", no="Keep it running"), answered)

    @work(thread=True, group="cancel")
    def _cancel(self) -> None:
        from widen_tui.launcher import cancel

        outcome = cancel(self._rundir)
        self.app.call_from_thread(self.notify, f"{self.run_id}: {outcome}")
        self._wake.set()  # look at the status now

    @work(thread=True, exclusive=True, group="figures")
    def action_write_figures(self) -> None:
        from engine.runs.events import read_all
        from widen_tui.views.plot import PlotError, run_figures

        run = self._rundir
        self.app.call_from_thread(self.notify, "writing PNG figures…", timeout=2)
        warnings: list[str] = []
        try:
            paths = run_figures(self.run_id, read_all(run.events), run.results(), run.path / "figures",
                                x=self.x_axis, warn=warnings.append)
        except (PlotError, OSError) as e:
            self.app.call_from_thread(self.notify, f"no figures: {e}", severity="error")
            return
        listing = "\n".join(str(p) for p in paths)
        self.app.call_from_thread(self.notify, f"wrote\n{listing}" + "".join(f"\n{w}" for w in warnings),
                                  timeout=8)


# ---------------------------------------------------------------------------------------------
# system views (Rich renderables)


def system_line(system: SystemEvent | None) -> Text:
    """One line: GPU memory and utilisation (or a clear "no GPU"), RSS and CPU."""
    line = Text()
    if not system:
        return Text("system: waiting for the first sample", style="dim")
    gpus = [g for g in system.gpus if "mem_total_mb" in g]
    if gpus:
        line.append(" · ".join(f"GPU{g['index']} {g['mem_used_mb'] / 1024:.1f}/{g['mem_total_mb'] / 1024:.1f} GB "
                               f"{g.get('util_percent', 0)}%" for g in gpus))
    else:
        line.append("no GPU", style="bold yellow")
    if is_number(system.torch_peak_mb):
        line.append(f" · torch peak {system.torch_peak_mb:,.0f} MB")
    line.append(f" · RSS {_mb(system.rss_mb)} · CPU {_percent(system.cpu_percent)}")
    return line


def _mb(value) -> str:
    return f"{value:,.0f} MB" if is_number(value) else "–"


def _percent(value) -> str:
    return f"{value:.0f}%" if is_number(value) else "–"


def _no_gpu_reason(status: str | None) -> str:
    """'no GPU (NVML: …)' -> 'NVML: …' (the panel already says "no GPU")."""
    text = (status or "").strip()
    if text.lower().startswith("no gpu"):
        text = text[6:].strip(" -—:").removeprefix("(").removesuffix(")")
    return text or "none found"


def system_view(system: SystemEvent | None, p: RunProgress) -> Table | Text:
    """The System tab: per GPU memory used/total and utilisation, torch's peak, RSS and CPU."""
    if not system:
        return Text("no system sample yet (the worker writes one every few seconds)", style="dim")
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    gpus = system.gpus
    if not gpus:
        table.add_row("GPU", Text(f"no GPU — {_no_gpu_reason(system.gpu_status)}", style="bold yellow"))
    for g in gpus:
        if "mem_total_mb" not in g:
            table.add_row(f"GPU {g.get('index')}", Text(f"unreadable: {g.get('error', '?')}", style="yellow"))
            continue
        used, total = g["mem_used_mb"], g["mem_total_mb"]
        share = used / total if total else 0.0
        bar = "█" * round(20 * share) + "░" * (20 - round(20 * share))
        table.add_row(f"GPU {g['index']}", f"{g.get('name', '')}")
        table.add_row("  memory", f"{bar} {used:,.0f} / {total:,.0f} MB ({100 * share:.0f}%)")
        table.add_row("  utilisation", f"{g.get('util_percent', 0)}%")
    peak = system.torch_peak_mb
    table.add_row("torch peak", f"{peak:,.0f} MB allocated by the run's process" if is_number(peak)
                  else "– (no CUDA in the run's process)")
    table.add_row("process", f"RSS {_mb(system.rss_mb)} · CPU {_percent(system.cpu_percent)} "
                             f"(100% = one core)")
    when = system.t
    if is_number(when) and p.started:
        table.add_row("sampled", f"+{fmt_duration(when - p.started)} into the run")
    return table


def ranks_view(p: RunProgress) -> Table:
    """The System tab's part for a run on several processes: each rank's own RSS and GPU memory,
    as the latest `ranks` event measured them (the rows above are rank 0's process and machine)."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    at = f" · stage {p.ranks_at[0] + 1} step {p.ranks_at[1]}" if p.ranks_at else ""
    table.add_row(Text(f"{p.world_size} processes{at}", style="bold"), "RSS", "GPU memory")
    for label, rss, gpu in rank_rows(p.ranks[:RANK_ROWS]):
        table.add_row(f"  {label}", rss, "no GPU" if gpu is None else gpu)
    more = rank_overflow(p.ranks, RANK_ROWS)
    if more:
        table.add_row(Text(f"  {more}", style="dim"), "", "")
    return table
