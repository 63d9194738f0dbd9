"""Rich renderables for the CLI: the live run view, the results tables, the runs list."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from widen_tui.views.activity import activity_line

if TYPE_CHECKING:  # the event records (pydantic) are not needed to list runs: `widen runs` stays quick
    from engine.runs.progress import RunProgress
    from engine.runs.records import RankRow

STATE_STYLE = {"done": "green", "running": "cyan", "queued": "yellow", "failed": "red",
               "cancelled": "magenta", "lost": "red", "stale": "yellow", "diverged": "red"}
# states that need attention (bold in tables)
ALERT_STATES = ("failed", "lost", "stale", "diverged")


def fmt_num(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value != value or value in (float("inf"), float("-inf")):
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) > 999):
        return f"{int(value):,}"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:,.2f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def state_text(state: str) -> Text:
    state = str(state)
    return Text(state, style=STATE_STYLE.get(state, "") + (" bold" if state in ALERT_STATES else ""))


def _fmt(value, spec: str) -> str:
    """`value` formatted with `spec`; "–" when missing (null: a non-finite value) or not a number."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return format(value, spec)


# a big world shows this many ranks, then one line for the rest
MAX_RANK_ROWS = 16


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def fmt_mb(mb) -> str:
    """A memory size: "812 MB", "10.2 GB"; "–" when there is none."""
    if not _is_num(mb) or mb < 0:
        return "–"
    return f"{mb:.0f} MB" if mb < 1024 else f"{mb / 1024:.1f} GB"


def rank_rows(ranks: list[RankRow]) -> list[tuple[str, str, str | None]]:
    """(label, rss, gpu) per rank of a `ranks` event: "rank 0" (with its host when the run
    gathered hostnames), its RSS, its GPU's memory — None for every rank of a run on CPUs, "–"
    for one rank that has no figure."""
    gpus = any(_is_num(r.gpu_mem_mb) for r in ranks)
    rows = []
    for r in ranks:
        label = f"rank {r.rank}" + (f" ({r.host})" if r.host else "")
        rows.append((label, fmt_mb(r.rss_mb), fmt_mb(r.gpu_mem_mb) if gpus else None))
    return rows


def rank_overflow(ranks: list[RankRow], shown: int = MAX_RANK_ROWS) -> str | None:
    """The line for the ranks past the first `shown`: how many, and the most memory among them."""
    rest = ranks[shown:]
    if not rest:
        return None
    peaks = [f"{name} up to {fmt_mb(max(values))}" for name, key in (("rss", "rss_mb"), ("gpu", "gpu_mem_mb"))
             if (values := [getattr(r, key) for r in rest if _is_num(getattr(r, key))])]
    return f"… {len(rest)} more ranks" + (f": {', '.join(peaks)}" if peaks else "")


def rank_lines(ranks: list[RankRow], shown: int = MAX_RANK_ROWS) -> list[str]:
    """One aligned line per rank: `rank 0  rss 812 MB  gpu 10.2 GB` (no gpu on CPUs)."""
    rows = rank_rows(ranks[:shown])
    width = max((len(label) for label, _, _ in rows), default=0)
    lines = [f"{label:<{width}}  rss {rss:>7}" + (f"  gpu {gpu:>7}" if gpu is not None else "")
             for label, rss, gpu in rows]
    more = rank_overflow(ranks, shown)
    return lines + ([more] if more else [])


def live_view(p: RunProgress) -> Panel:
    """What `widen watch` shows: stage, step, loss, evals, speed, memory, ETA."""
    head = Table.grid(padding=(0, 2))
    device = (p.device or "–") + (f" × {p.world_size} processes" if p.world_size > 1 else "")
    head.add_row("state", state_text(p.state), "device", device)
    activity = activity_line(p)
    if activity:  # loading, tokenizing, evaluating: no step comes for a while
        head.add_row("now", Text(activity, style="bold"), "", "")
    stage_total = p.stage_steps[p.stage] if p.stage < len(p.stage_steps) else 0
    head.add_row("stage", f"{p.stage + 1}/{len(p.stage_steps) or '?'} {p.stage_name} ({p.task})",
                 "step", f"{p.step}/{stage_total}")
    head.add_row("loss", fmt_num(p.loss), "lr", fmt_num(p.lr))
    head.add_row("tokens/s", fmt_num(p.tokens_per_s and round(p.tokens_per_s)), "tokens", fmt_num(p.tokens))
    head.add_row("elapsed", fmt_duration(p.elapsed_s()), "ETA", fmt_duration(p.eta_s()))
    sysinfo = p.system
    if sysinfo:
        gpu = "; ".join(f"GPU{g.get('index')} {_fmt(g.get('mem_used_mb'), '.0f')}/{_fmt(g.get('mem_total_mb'), '.0f')} "
                        f"MB {g.get('util_percent', 0)}%" for g in sysinfo.gpus) \
            or sysinfo.gpu_status or "no GPU"
        head.add_row("memory", f"RSS {fmt_num(sysinfo.rss_mb)} MB", "gpu", gpu)
        if sysinfo.torch_peak_mb is not None:
            head.add_row("torch peak", f"{_fmt(sysinfo.torch_peak_mb, '.0f')} MB", "", "")
    for label, rss, gpu in rank_rows(p.ranks[:MAX_RANK_ROWS]):  # a distributed run: each process's own
        head.add_row(label, f"rss {rss}", "" if gpu is None else "gpu", gpu or "")
    if rank_overflow(p.ranks):
        head.add_row("", rank_overflow(p.ranks), "", "")
    bar = ProgressBar(total=max(p.total_steps, 1), completed=p.global_step, width=50)

    evals = Table("task", "loss", "ppl", "bits/byte", "at", box=None, header_style="bold")
    for task, e in p.eval.items():
        at = "initial" if e.stage < 0 else f"stage {e.stage + 1} step {e.step}"
        evals.add_row(task, fmt_num(e.loss), fmt_num(e.ppl), fmt_num(e.bpb), at)
    parts = [head, bar, Text("")]
    if p.eval:
        parts.append(evals)
    if p.expansions:
        parts += [Text(""), expansions_table([e.to_json() for e in p.expansions])]
    if p.error:
        parts += [Text(""), Text(f"error: {p.error}", style="red")]
    return Panel(Group(*parts), title=f"{p.plan or 'run'} · {p.run}", border_style=STATE_STYLE.get(p.state, ""))


def expansions_table(reports: list[dict]) -> Table:
    """Expansion reports as results.json and `widen preview` have them (an expand event's fields)."""
    table = Table(title="expansions (measured on a fixed probe batch)", title_justify="left",
                  header_style="bold")
    for col in ("stage", "op", "added", "trainable", "exact", "max|Δlogits|", "loss before→after",
                "new grad"):
        table.add_column(col, justify="left" if col == "op" else "right", no_wrap=True)
    for r in reports:
        if not isinstance(r, dict):
            continue
        share = r.get("trainable_share", 0)
        trainable = "–"
        if r.get("trainable") is not None:
            trainable = fmt_num(r.get("trainable")) + (f" ({100 * share:.1f}%)" if _fmt(share, "") != "–" else "")
        stage = r.get("stage")
        table.add_row(str(stage + 1) if isinstance(stage, int) else "?", str(r.get("op")),
                      fmt_num(r.get("params_added")), trainable,
                      "yes" if r.get("exact") else "no", _fmt(r.get("max_abs_logit_delta"), ".2e"),
                      f"{_fmt(r.get('loss_before'), '.4f')}→{_fmt(r.get('loss_after'), '.4f')}",
                      fmt_num(r.get("new_grad_norm")))
    return table


def _signed(value, digits: int = 4) -> str:
    return _fmt(value, f"+.{digits}f")


def results_view(results: dict) -> Group:
    """The end-of-run tables: the evaluation matrix (perplexity, bits per byte, generation scores)
    with forgetting, the continual-learning summary, parameters per stage, and expansions."""
    m = results.get("matrix") if isinstance(results.get("matrix"), dict) else {}
    tasks, rows = list(m.get("tasks") or []), list(m.get("rows") or [])
    forgetting = results.get("forgetting") if isinstance(results.get("forgetting"), dict) else {}
    by_bpb, by_ppl = forgetting.get("bpb") or {}, forgetting.get("ppl") or {}
    ppl = Table(title=f"perplexity per task after each stage · forgetting: "
                      f"{results.get('forgetting_definition', '')} · {results.get('sign_convention', '')}",
                title_justify="left", header_style="bold")
    ppl.add_column("task")
    for label in rows:
        ppl.add_column(label, justify="right")
    ppl.add_column("forgetting (ppl)", justify="right")
    ppl.add_column("forgetting (bits/byte)", justify="right")
    for j, task in enumerate(tasks):
        f, fb = by_ppl.get(task) or {}, by_bpb.get(task) or {}
        relative = fb.get("relative")
        ppl.add_row(str(task), *[fmt_num(_cell(row, j)) for row in m.get("ppl") or []],
                    _signed(f.get("absolute"), 3),
                    _signed(fb.get("absolute")) + (f" ({_fmt(100 * relative, '+.1f')}%)"
                                                  if isinstance(relative, (int, float)) else ""))
    parts = [ppl]
    bpb = m.get("bpb")
    if bpb:
        table = Table(title="bits per byte (R[stage][task], the comparable loss)", title_justify="left",
                      header_style="bold")
        table.add_column("task")
        for label in rows:
            table.add_column(label, justify="right")
        for j, task in enumerate(tasks):
            table.add_row(str(task), *[fmt_num(_cell(row, j), 4) for row in bpb])
        parts.append(table)
    for score in ("exact_match", "bleu"):
        if m.get(score) and any(_cell(row, j) is not None for row in m[score] for j in range(len(tasks))):
            table = Table(title=f"{score.replace('_', ' ')} per task after each stage (generation tasks)",
                          title_justify="left", header_style="bold")
            table.add_column("task")
            for label in rows:
                table.add_column(label, justify="right")
            for j, task in enumerate(tasks):
                if any(_cell(row, j) is not None for row in m[score]):
                    table.add_row(str(task), *[fmt_num(_cell(row, j)) for row in m[score]])
            parts.append(table)
    c = results.get("continual") or {}
    if c:
        parts.append(Text(f"continual ({c.get('metric', 'bpb')}): ACC {fmt_num(c.get('acc'), 4)} · "
                          f"BWT {_signed(c.get('bwt'))} · FWT {_signed(c.get('fwt'))} "
                          f"(BWT/FWT as in GEM on −loss: positive = better)"))

    params = Table(title="parameters per stage", title_justify="left", header_style="bold")
    for col in ("stage", "task", "total", "trainable", "share"):
        params.add_column(col, justify="left" if col in ("stage", "task") else "right")
    for s in results.get("stages") or []:
        if not isinstance(s, dict):
            continue
        share = s.get("trainable_share")
        params.add_row(str(s.get("name")), str(s.get("task")), fmt_num(s.get("total")), fmt_num(s.get("trainable")),
                       f"{_fmt(100 * share, '.2f')}%" if isinstance(share, (int, float)) else "–")
    parts.append(params)
    summary = results.get("summary") if isinstance(results.get("summary"), dict) else {}
    footer = Text(f"state {results.get('state')} · params added {fmt_num(summary.get('params_added'))} · "
                  f"growths {summary.get('growths', 0)} · tokens {fmt_num(summary.get('tokens'))} · "
                  f"{fmt_num(summary.get('tokens_per_s') and round(summary['tokens_per_s']))} tokens/s · "
                  f"wall {fmt_duration(summary.get('wall_s'))} · peak RSS {fmt_num(summary.get('peak_rss_mb'))} MB"
                  + (" · shared stages from the prefix cache" if summary.get("prefix_cached") else ""))
    if results.get("expansions"):
        parts.append(expansions_table(results["expansions"]))
    if results.get("sweep"):
        from widen_tui.sweeps import heatmap, speedup_line

        sweep = results["sweep"]
        parts += [Text(f"mapping sweep on {sweep.get('task')} (no training; `widen plot` draws it as a figure)"),
                  heatmap(sweep), Text(speedup_line(sweep))]
    return Group(*parts, footer)


def _ms(stat: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    """mean ± std (or the value alone for one seed)."""
    if not stat:
        return "–"

    def fmt(v):
        return f"{round(v):,}" if digits == 0 else fmt_num(v, digits)

    mean = fmt(stat["mean"] * scale)
    return mean if stat["n"] < 2 else f"{mean}±{fmt(stat['std'] * scale)}"


def comparison_view(data: dict) -> Group:
    """The layer-widening proposal's table, in two parts that fit a terminal: what each variant
    learned and forgot (per-task perplexity and forgetting, ACC, BWT), then what it cost
    (parameters added, trainable share, time, speed, memory). Mean ± std over seeds."""
    tasks = data["tasks"]
    seeded = data.get("seeded")
    over = " (mean ± std over seeds)" if seeded else ""
    quality = Table(title=f"per task{over} · forgetting in bits/byte, {data['forgetting_definition']} · "
                          f"{data['sign_convention']}", title_justify="left", header_style="bold")
    quality.add_column("variant")
    for task in tasks:
        quality.add_column(f"ppl {task}", justify="right")
    for task in tasks:
        quality.add_column(f"forgetting {task}", justify="right")
    quality.add_column("ACC", justify="right")
    quality.add_column("BWT", justify="right")
    cost = Table(title=f"parameters and cost{over}", title_justify="left", header_style="bold")
    gpu = any(g["torch_peak_mb"] for g in data["groups"])  # runs on a GPU: torch's own peak too
    # mixtures of experts: the parameters a token goes through (its top-k experts), beside all of them
    sparse = any(g.get("active_params") and g["params"] and g["active_params"]["mean"] != g["params"]["mean"]
                 for g in data["groups"])
    for col in ("variant", "seeds", "params", *(["active"] if sparse else []), "added", "trainable", "share",
                "time (all stages)", "tokens/s", "peak RSS MB", *(["GPU peak MB"] if gpu else [])):
        cost.add_column(col, justify="left" if col == "variant" else "right")
    for g in data["groups"]:
        name = g["variant"] or g["plan"]
        quality.add_row(name, *[_ms(g["final_ppl"].get(t), 2) for t in tasks],
                        *[_ms(g["forgetting"].get(t), 4) for t in tasks], _ms(g["acc"], 4), _ms(g["bwt"], 4))
        cost.add_row(name, ",".join(str(x) for x in g["seeds"]), _ms(g["params"], 0),
                     *([_ms(g.get("active_params"), 0)] if sparse else []), _ms(g["params_added"], 0),
                     _ms(g["trainable"], 0),
                     _ms(g["trainable_share"], 2, 100) + "%" if g["trainable_share"] else "–",
                     _ms(g["wall_s"], 1) + "s" if g["wall_s"] else "–", _ms(g["tokens_per_s"], 0),
                     _ms(g["peak_rss_mb"], 0), *([_ms(g["torch_peak_mb"], 0)] if gpu else []))
    parts = [quality, cost]
    grew = any(r.get("growths") for r in data["runs"])
    if grew and len(data["runs"]) > 1:  # grown models are comparable by compute, not by steps
        first = data["runs"][0]
        compute = Table(title=f"training loss at equal compute ({fmt_num(first.get('equal_flops_budget'))} "
                              f"FLOPs) and equal tokens ({fmt_num(first.get('equal_tokens_budget'))})",
                        title_justify="left", header_style="bold")
        for col in ("variant", "seed", "growths", "loss @ FLOPs", "loss @ tokens", "total FLOPs", "final params"):
            compute.add_column(col, justify="left" if col == "variant" else "right")
        for r in data["runs"]:
            compute.add_row(str(r.get("variant") or r.get("name")), str(r.get("seed")), str(r.get("growths") or 0),
                            fmt_num(r.get("loss_at_equal_flops"), 4), fmt_num(r.get("loss_at_equal_tokens"), 4),
                            fmt_num(r.get("flops")), fmt_num(r.get("params")))
        parts.append(compute)
    health = [(r, u) for r in data["runs"] for u in r.get("new_units") or []]
    if health:
        units = Table(title="health of new units (at expansion → after training): dead = zero gradient; "
                            "cosine 1 = identical units or collapsed twins", title_justify="left", header_style="bold")
        for col in ("variant", "op", "init", "max|Δlogits|", "new grad", "dead", "pair cos", "pair cos after",
                    "twin cos after"):
            units.add_column(col, justify="left" if col in ("variant", "op", "init") else "right")
        for r, u in health:
            units.add_row(str(r.get("variant") or r.get("name")), u["op"], str(u.get("init") or "–"),
                          f"{u['max_abs_logit_delta']:.1e}" if u.get("max_abs_logit_delta") is not None else "–",
                          fmt_num(u.get("new_grad_norm")), fmt_num(u.get("dead_share")),
                          fmt_num(u.get("max_pairwise_cosine")), fmt_num(u.get("max_pairwise_cosine_after")),
                          fmt_num(u.get("max_twin_cosine_after")))
        parts.append(units)
    not_done = [r["id"] for r in data["runs"] if r.get("state") != "done"]
    if not_done:
        parts.append(Text(f"not done (figures partial or missing): {', '.join(not_done)}", style="yellow"))
    return Group(*parts)


def target_view(report) -> Group:
    """Compute to target (``engine.runs.compute_to_target.TargetReport``): per variant, mean ± std
    over seeds and the ratio to the baseline; with seeds, each run too; and, when the baseline's
    seeds ended apart, how many seeds of each variant reached the strictest target (the best
    baseline seed's final loss; the title's rule says when it is the target itself)."""
    from engine.runs import compute_to_target as ctt

    tables = [(ctt.title(report), ctt.group_rows(report))]
    if any(len(g.runs) > 1 for g in report.groups):  # one run per variant: the variant table is the runs table
        tables.append(("each run", ctt.run_rows(report)))
    strict = ctt.strict_rows(report)
    if strict is not None:
        tables.append((ctt.strict_title(report), strict))
    parts = []
    for caption, (columns, rows) in tables:
        table = Table(title=caption, title_justify="left", header_style="bold")
        for j, col in enumerate(columns):
            if col in ("variant", "run"):  # the names tell the rows apart: never cut, the other cells wrap
                width = max([len(col), *(len(str(row[j])) for row in rows)])
                table.add_column(col, justify="left", no_wrap=True, min_width=width)
            else:
                table.add_column(col, justify="left" if col == "evals" else "right")
        for row in rows:
            table.add_row(*row)
        parts.append(table)
    return Group(*parts)


def runs_table(records: list[dict]) -> Table:
    table = Table(header_style="bold")
    for col in ("id", "name", "seed", "state", "stage", "step", "final ppl", "age"):
        table.add_column(col)
    now = time.time()
    for r in records:
        summary = r.get("summary") if isinstance(r.get("summary"), dict) else {}
        ppl = summary.get("final_ppl") if isinstance(summary.get("final_ppl"), dict) else {}
        created = r.get("created_ts") or _parse_time(r.get("created"))
        stage = r.get("stage")
        table.add_row(str(r["id"]), str(r.get("name") or ""), "–" if r.get("seed") is None else str(r["seed"]),
                      state_text(r.get("state", "?")),
                      str(stage + 1) if isinstance(stage, int) else "–",
                      "–" if r.get("step") is None else str(r["step"]),
                      " ".join(f"{t}={_fmt(v, '.2f')}" for t, v in ppl.items()) or "–",
                      fmt_duration(now - created) if created else "–")
    return table


def _cell(row, j: int):
    """row[j] of a results matrix row, None when the row is short or not a list."""
    return row[j] if isinstance(row, list) and j < len(row) else None


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
