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
"""

from __future__ import annotations

import math

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
    stage have no forgetting (None).
    """
    final = len(matrix) - 1
    out: dict[str, dict | None] = {}
    for task in matrix[-1]:
        first = trained_at.get(task)
        earlier = range(first + 1, final) if first is not None else range(0)
        if not earlier:
            out[task] = None
            continue
        best = min(matrix[k][task][metric] for k in earlier)
        absolute = matrix[final][task][metric] - best
        out[task] = {"metric": metric, "definition": FORGETTING_DEFINITION, "best": best,
                     "final": matrix[final][task][metric], "absolute": absolute,
                     "relative": absolute / best if best else None}
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
