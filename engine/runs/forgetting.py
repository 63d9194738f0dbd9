"""Continual-learning figures over the evaluation matrix R[row][task].

Rows are "initial" (the un-grown base model, before any training) and one per stage, after that
stage trained. The comparable figure is **bits per byte** (it stays meaningful when the model or
the tokenizer changes); every function takes the metric to use, and all of them are *losses*
(lower is better) except the generation scores (exact match, BLEU), which are not used here.

Sign conventions, stated once and printed in every table header:
- forgetting: positive = worse retention. Max-based (Chaudhry et al. 2018): the final loss minus
  the best (lowest) loss the task had after any earlier stage since it was first trained.
- BWT and FWT follow GEM (Lopez-Paz & Ranzato 2017) on performance = −loss: positive = better.
  BWT = mean over tasks trained before the last stage of (loss after its own stage − final loss);
  negative BWT means later stages hurt earlier tasks. FWT = mean over tasks not trained by the
  first stage of (base model's loss − loss just before the task's own stage): positive means the
  earlier stages already helped the task, compared with the un-grown base model.
- ACC (Avalanche's "average accuracy" on a loss): the mean final loss over every task.

``matrix_for(results, events)`` is a run's matrix wherever it is: results.json's at the end, else
one rebuilt from the evaluations so far (``engine.runs.curves.matrix_from_events``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.runs.curves import matrix_from_events
from engine.runs.records import EventRecord, is_number

SIGN_CONVENTION = ("forgetting: positive = worse retention; BWT/FWT (GEM, on −loss): positive = better; "
                   "ACC: mean final bits per byte (lower = better)")
FORGETTING_DEFINITION = "max-based (Chaudhry et al.): final minus best earlier value"
COMPARABLE_METRIC = "bpb"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def forgetting(matrix: list[dict], trained_at: dict[str, int], metric: str = COMPARABLE_METRIC
               ) -> dict[str, dict | None]:
    """Per task: absolute and relative forgetting after the last row.

    `matrix[k][task][metric]` is the figure after row k (row 0 = initial, row s+1 = after stage s);
    `trained_at[task]` is the first stage that trained the task. Tasks not trained before the final
    stage have no forgetting (None); a missing figure (None: a matrix rebuilt from a run's events
    before it ended) is left out, and a task without its final figure has none either.
    """
    final = len(matrix) - 1
    out: dict[str, dict | None] = {}
    for task in matrix[-1]:
        first = trained_at.get(task)
        earlier = [v for k in (range(first + 1, final) if first is not None else ())
                   if (v := matrix[k].get(task, {}).get(metric)) is not None]
        last = matrix[final][task].get(metric)
        if not earlier or last is None:
            out[task] = None
            continue
        best = min(earlier)
        absolute = last - best
        out[task] = {"metric": metric, "definition": FORGETTING_DEFINITION, "best": best,
                     "final": last, "absolute": absolute, "relative": absolute / best if best else None}
    return out


def backward_transfer(matrix: list[dict], trained_at: dict[str, int], metric: str = COMPARABLE_METRIC
                      ) -> float | None:
    """BWT (GEM) on performance = −loss: mean over tasks of R[after its stage][j] − R[final][j].
    Negative = the later stages made earlier tasks worse."""
    final = len(matrix) - 1
    deltas = [matrix[s + 1][t][metric] - matrix[final][t][metric]
              for t, s in trained_at.items() if s + 1 < final]
    return sum(deltas) / len(deltas) if deltas else None


def forward_transfer(matrix: list[dict], trained_at: dict[str, int], metric: str = COMPARABLE_METRIC
                     ) -> float | None:
    """FWT (GEM) on performance = −loss, against the un-grown base model (row 0): mean over tasks
    first trained at stage s >= 1 of R[initial][j] − R[before stage s][j]. Positive = the earlier
    stages (and the growth they brought) already helped the task."""
    deltas = [matrix[0][t][metric] - matrix[s][t][metric]
              for t, s in trained_at.items() if s >= 1 and s < len(matrix)]
    return sum(deltas) / len(deltas) if deltas else None


def average_final(matrix: list[dict], metric: str = COMPARABLE_METRIC) -> float | None:
    """ACC: the mean over tasks of the final figure."""
    if not matrix:
        return None
    final = matrix[-1]
    return sum(final[t][metric] for t in final) / len(final)


def continual_summary(matrix: list[dict], trained_at: dict[str, int], metric: str = COMPARABLE_METRIC) -> dict:
    """ACC, BWT, FWT and per-task forgetting, labelled with their metric and conventions."""
    if not matrix:
        return {}
    return {"metric": metric, "sign_convention": SIGN_CONVENTION,
            "forgetting_definition": FORGETTING_DEFINITION,
            "acc": average_final(matrix, metric), "bwt": backward_transfer(matrix, trained_at, metric),
            "fwt": forward_transfer(matrix, trained_at, metric),
            "forgetting": forgetting(matrix, trained_at, metric)}


# ---------------------------------------------------------------------------------------------
# a run's matrix, wherever it is

FROM_RESULTS, FROM_EVENTS = "results.json", "evaluations so far"


@dataclass(frozen=True)
class EvalMatrix:
    """A run's evaluation matrix: `grid` in results.json's shape (rows, tasks, and per metric a
    rows × tasks list, None where a figure is missing), with the task each row's stage trained
    (None: the initial row) and results.json's own forgetting figures (``given``, per metric)."""

    source: str                          # FROM_RESULTS | FROM_EVENTS
    grid: dict
    trained: list[str | None]
    given: dict = field(default_factory=dict)

    @property
    def rows(self) -> list[str]:
        return list(self.grid["rows"])

    @property
    def tasks(self) -> list[str]:
        return list(self.grid.get("tasks") or [])

    @property
    def partial(self) -> bool:
        """Rebuilt from the evaluations so far: the run has no results.json (yet)."""
        return self.source == FROM_EVENTS

    def metric(self) -> str:
        """The comparable figure when the matrix has it (bits per byte), else the loss."""
        bpb = self.grid.get("bpb")
        return "bpb" if isinstance(bpb, list) and any(is_number(v) for row in bpb if isinstance(row, list)
                                                       for v in row) else "loss"

    def values(self, metric: str) -> list[list]:
        """rows × tasks figures of `metric` (None where there is none)."""
        grid = self.grid.get(metric)
        width = len(self.tasks)
        if not isinstance(grid, list):
            return [[None] * width for _ in self.rows]
        return [[row[j] if isinstance(row, list) and j < len(row) else None for j in range(width)] for row in grid]

    def forgetting(self, metric: str) -> dict[str, float | None]:
        """Absolute forgetting per task (see ``forgetting``): results.json's own figure where it
        has one, else computed from the matrix."""
        given = self.given.get(metric) if isinstance(self.given.get(metric), dict) else {}
        values, tasks = self.values(metric), self.tasks
        rows = [{task: {metric: row[j]} for j, task in enumerate(tasks)} for row in values]
        trained_at: dict[str, int] = {}
        for i, task in enumerate(self.trained):
            if task is not None and i > 0:
                trained_at.setdefault(task, i - 1)  # row i is after stage i - 1
        computed = forgetting(rows, trained_at, metric) if rows else {}
        out: dict[str, float | None] = {}
        for task in tasks:
            if task in given:
                out[task] = given[task].get("absolute") if isinstance(given[task], dict) else None
            else:
                found = computed.get(task)
                out[task] = found["absolute"] if found else None
        return out


def matrix_for(results: dict | None, events: Sequence[EventRecord]) -> EvalMatrix | None:
    """The run's matrix: results.json's when it has rows, else one rebuilt from the stage-end
    evaluations in `events` (a run still going, or one that ended without results); None when
    there is no row yet."""
    results = results if isinstance(results, dict) else {}
    matrix = results.get("matrix")
    if isinstance(matrix, dict) and isinstance(matrix.get("rows"), list) and matrix["rows"]:
        stages = results.get("stages") if isinstance(results.get("stages"), list) else []
        trained = [None] + [s.get("task") if isinstance(s, dict) else None for s in stages]
        forgetting_given = results.get("forgetting") if isinstance(results.get("forgetting"), dict) else {}
        return EvalMatrix(FROM_RESULTS, matrix, _fit(trained, len(matrix["rows"])), forgetting_given)
    rebuilt = matrix_from_events(events) if events else None
    if not rebuilt:
        return None
    return EvalMatrix(FROM_EVENTS, rebuilt, _fit(rebuilt["trained"], len(rebuilt["rows"])))


def _fit(trained: list, rows: int) -> list:
    return (list(trained) + [None] * rows)[:rows]
