"""The growth lineage of compared runs: base → grown variants → automatic growths.

Derived from run.json and the events alone (no torch, no Textual):

- Runs of one ``group`` (one ``widen run`` of a plan with variants) whose run.json has
  ``prefix_stages`` > 0 share those stages: they are trained once and the other variants start
  from the prefix cache (their copies of those events carry ``"cached": true``). That shared
  part is the **base**; each variant **branches** from it where the shared stages end. The cache
  key includes the seed, so a group run with several seeds has one base per seed; variants whose
  shared stages trained differently (a variant with its own model) get a base of their own — two
  runs share a base when their shared stages logged the same losses.
- Every automatic growth (an ``expand`` event with a ``trigger``, e.g. "plateau") is a branch
  point inside a run: the grown model descends from the model before the growth.

Each node owns one segment of one run's training curve (its step events); a child's segment
begins where its parent's ends. `LineageNode.joined_points` prefixes a segment with the parent's
last point, so drawing every node that way shows base and branches as one connected picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.runs.compare_data import LoadedRun
from engine.runs.curves import Placed, RunCurves, is_number
from engine.runs.events import latest_segment
from engine.runs.records import EventRecord, ExpandEvent, StageEvent, StepEvent
from widen_tui.views.report import fmt_num


@dataclass(eq=False)
class LineageNode:
    label: str
    kind: str                                  # "group" | "base" | "run" | "growth"
    run_id: str | None = None                  # the run whose step events make `points`
    points: list[StepEvent] = field(default_factory=list)
    detail: str = ""                           # one line for the status bar
    short: str = ""                            # the chart legend's name for this segment
    children: list[LineageNode] = field(default_factory=list)
    parent: LineageNode | None = field(default=None, repr=False)
    events: list[ExpandEvent] = field(default_factory=list, repr=False)  # expand events where it begins
    begins: dict[int, StageEvent] = field(default_factory=dict, repr=False)  # their stages' begin events

    def add(self, child: LineageNode) -> LineageNode:
        child.parent = self
        self.children.append(child)
        return child

    def branch_point(self) -> StepEvent | None:
        """The last point of the nearest ancestor with a curve: where this segment joins it."""
        node = self.parent
        while node is not None:
            if node.points:
                return node.points[-1]
            node = node.parent
        return None

    def joined_points(self) -> list[StepEvent]:
        """The segment, starting at the branch point so that it continues its parent's curve."""
        start = self.branch_point()
        return ([start] if start and self.points else []) + self.points

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def build_lineage(runs: list[LoadedRun]) -> list[LineageNode]:
    """The lineage forest of `runs`: one root per group (in the order the runs came) and one per
    run outside any group."""
    roots: list[LineageNode] = []
    groups: dict[str, list[LoadedRun]] = {}
    for run in runs:
        group = run.info.get("group")
        if not group:
            roots.append(_run_node(run, train_steps(run.events)))
        elif group not in groups:
            groups[group] = [run]
            roots.append(LineageNode(group, "group"))  # filled below, keeps the order
        else:
            groups[group].append(run)
    for i, root in enumerate(roots):
        if root.kind == "group":
            roots[i] = _group_node(root.label, groups[root.label])
    return roots


def train_steps(events: list[EventRecord]) -> list[StepEvent]:
    """Step events (with a finite loss) by global step, of the latest segment (what a resume
    voided is dropped); where steps repeat, the later copy wins."""
    by_step = {e.global_step: e for e in latest_segment(events)
               if isinstance(e, StepEvent) and is_number(e.global_step) and is_number(e.loss)}
    return [by_step[g] for g in sorted(by_step)]


def _group_node(group: str, members: list[LoadedRun]) -> LineageNode:
    plan = members[0].info.get("plan_name") or members[0].info.get("name") or group
    shared = max(int(r.info.get("prefix_stages") or 0) for r in members)
    node = LineageNode(f"{plan} · group …{group[-4:]}", "group",
                       detail=f"group {group}: {len(members)} run(s) of plan {plan}")
    if not shared:  # variants without shared stages start side by side from the same model
        node.detail += " · no shared stages: each variant trains from the start"
        for run in members:
            node.add(_run_node(run, train_steps(run.events)))
        return node
    bases = _bases(members, shared)
    for i, base_runs in enumerate(bases):
        node.add(_base_node(base_runs, shared, f"base {i + 1}" if len(bases) > 1 else "base"))
    return node


def _bases(members: list[LoadedRun], shared: int) -> list[list[LoadedRun]]:
    """Members grouped by the base they share: same seed and the same losses in the shared
    stages (a run still inside them joins a base whose losses begin with its own)."""
    bases: list[tuple[tuple, list[LoadedRun]]] = []
    for run in members:
        seed = run.info.get("seed")
        mine = tuple((e.global_step, round(float(e.loss), 5)) for e in _prefix(run, shared))
        for i, (key, runs) in enumerate(bases):
            theirs = key[1]
            if key[0] == seed and (theirs[:len(mine)] == mine or mine[:len(theirs)] == theirs):
                runs.append(run)
                bases[i] = ((seed, max(mine, theirs, key=len)), runs)
                break
        else:
            bases.append(((seed, mine), [run]))
    return [runs for _, runs in bases]


def _prefix(run: LoadedRun, shared: int) -> list[StepEvent]:
    return [e for e in train_steps(run.events) if e.stage < shared]


def _base_node(runs: list[LoadedRun], shared: int, short: str) -> LineageNode:
    # the run that trained the shared stages itself (its copy is not cached), else the longest copy
    source = max(runs, key=lambda r: (not any(e.cached for e in _prefix(r, shared)), len(_prefix(r, shared))))
    points = _prefix(source, shared)
    names = [e.name for e in source.events if isinstance(e, StageEvent) and e.phase == "begin" and e.stage < shared]
    names = list(dict.fromkeys(n for n in names if n))
    params = points[-1].params if points else None
    label = f"base: {', '.join(names) or f'{shared} shared stage(s)'}"
    seed = runs[0].info.get("seed")
    label += f" · seed {seed}" if seed is not None else ""
    cached = [r.label for r in runs if r is not source]
    base = LineageNode(label, "base", source.id, points, short=short,
                       detail=f"{label} · {len(points)} steps · {fmt_num(params)} params · trained by "
                              f"{source.label}" + (f"; {', '.join(cached)} start from the prefix cache"
                                                  if cached else ""))
    _add_growths(base, source, points)
    branch = points[-1].global_step if points else 0
    for run in runs:
        own = [e for e in train_steps(run.events) if e.global_step > branch]
        _attach(base, _run_node(run, own, branched_at=branch))
    return base


def _attach(parent: LineageNode, child: LineageNode) -> None:
    """Hang `child` below the last node of `parent`'s growth chain (the model it grew into)."""
    while parent.children and parent.children[-1].kind == "growth":
        parent = parent.children[-1]
    parent.add(child)


def _run_node(run: LoadedRun, points: list[StepEvent], branched_at: int | None = None) -> LineageNode:
    state = run.status.get("state", "?")
    begins = {e.stage: e for e in run.events if isinstance(e, StageEvent) and e.phase == "begin"}
    # the run's own stage-start expansions (not the cached shared ones), each with its stage's
    # begin event: where it sits on any axis
    ops = [e for e in run.events if isinstance(e, ExpandEvent) and not e.trigger and not e.cached]
    ops = [e for e in ops if branched_at is None or _begin_step(begins.get(e.stage)) >= branched_at]
    added = sum(int(e.params_added or 0) for e in ops)
    grown = f" · +{added:,} params ({', '.join(dict.fromkeys(e.op for e in ops))})" if ops else ""
    where = f" · branches at step {branched_at}" if branched_at is not None else ""
    node = LineageNode(f"{run.label} ({state})", "run", run.id, short=run.label, events=ops,
                       begins={e.stage: begins[e.stage] for e in ops if e.stage in begins},
                       detail=f"{run.label} · {run.id} · {state}{where}{grown}")
    node.points = _add_growths(node, run, points)
    return node


def _begin_step(begin: StageEvent | None) -> float:
    """The global step at which a stage began (0 when its begin event does not say)."""
    return begin.global_step if begin is not None and is_number(begin.global_step) else 0


@dataclass
class Growth:
    """One automatic growth: its operators' expand events together."""

    stage: int
    growth: int | None
    global_step: float | None
    tokens: float | None
    flops: float | None
    trigger: object
    params_before: float | None
    params_after: float | None = None
    params_added: int = 0
    ops: list[str] = field(default_factory=list)
    events: list[ExpandEvent] = field(default_factory=list)


def growths(run: LoadedRun) -> list[Growth]:
    """One entry per automatic growth (several operators of one growth log one expand each):
    its stage, index, global step, tokens, FLOPs, params before/after and the ops."""
    found: dict[tuple, Growth] = {}
    for e in run.events:
        if not isinstance(e, ExpandEvent) or not e.trigger:
            continue
        entry = found.setdefault((e.stage, e.growth, e.global_step),
                                 Growth(e.stage, e.growth, e.global_step, e.tokens, e.flops, e.trigger,
                                        e.params_before))
        entry.params_added += int(e.params_added or 0)
        entry.params_after = e.params_after
        entry.ops.append(e.op)
        entry.events.append(e)
    return sorted(found.values(), key=lambda g: g.global_step or 0)


def _add_growths(node: LineageNode, run: LoadedRun, points: list[StepEvent]) -> list[StepEvent]:
    """Split `points` at the run's growths inside them: `node` keeps the part before the first,
    each growth becomes a child of the one before. Returns (and sets) `node`'s own points."""
    first, last = (points[0].global_step, points[-1].global_step) if points else (None, None)
    inside = [g for g in growths(run) if points and g.global_step is not None and first <= g.global_step < last]
    cuts = [g.global_step for g in inside]
    node.points = [p for p in points if not cuts or p.global_step <= cuts[0]]
    parent = node
    for k, growth in enumerate(inside):
        end = cuts[k + 1] if k + 1 < len(cuts) else None
        segment = [p for p in points if p.global_step > cuts[k] and (end is None or p.global_step <= end)]
        index = growth.growth if growth.growth is not None else k
        label = (f"growth {index + 1} @ step {growth.global_step}: "
                 f"+{growth.params_added:,} → {fmt_num(growth.params_after)}")
        detail = (f"{run.label}: {growth.trigger} growth at step {growth.global_step} "
                  f"({fmt_num(growth.tokens)} tokens, {_sci(growth.flops)} FLOPs) · "
                  f"{'+'.join(growth.ops)} · {fmt_num(growth.params_before)} → "
                  f"{fmt_num(growth.params_after)} params")
        parent = parent.add(LineageNode(label, "growth", run.id, segment, detail=detail,
                                        short=f"{run.label} g{index + 1}", events=growth.events))
    return node.points


def _sci(value) -> str:
    return "–" if value is None else f"{float(value):.2e}"


def charted_nodes(roots: list[LineageNode]) -> list[LineageNode]:
    """The nodes that have a curve, in the order `lineage_curves` draws them (a chart's colours
    go by that order, so a tree can show each node's colour)."""
    return [node for root in roots for node in root.walk() if node.points]


def lineage_curves(roots: list[LineageNode]) -> list[RunCurves]:
    """One curve per segment of the lineage, each starting at its branch point, for `LossChart`:
    the base and its branches drawn as one connected picture. Training loss only; a variant's
    operators are a ◆ and a growth a ▲ where its segment begins."""
    out = []
    for node in charted_nodes(roots):
        points = node.joined_points()
        # one stage id: the chart joins a segment's points even across a task switch
        curve = RunCurves(node.short or node.label, steps=[p.model_copy(update={"stage": 0}) for p in points])
        # a variant's operators (◆) where their stage began, a growth (▲) where it happened
        ops = [e for e in node.events if not e.trigger]
        curve.stage_begins = {e.stage: Placed(node.begins[e.stage], _begin_step(node.begins[e.stage]))
                              for e in ops if e.stage in node.begins}
        curve.expansions = ops
        curve.growths = [Placed(e, e.global_step if e.global_step is not None else 0)
                         for e in node.events if e.trigger]
        out.append(curve)
    return out
