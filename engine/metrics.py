"""Continual-learning figures over the evaluation matrix R[row][task].

Rows are "initial" (before any training) and one per stage, after that stage trained.
Sign convention, everywhere: positive forgetting = worse retention (the loss went up).
Forgetting is max-based (Chaudhry et al. 2018): the final loss minus the best (lowest) loss
the task had after any earlier stage since it was first trained.
"""

from __future__ import annotations

import math

SIGN_CONVENTION = "positive forgetting = worse retention (the loss went up)"
FORGETTING_DEFINITION = "max-based (Chaudhry et al.): final minus best earlier value"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def forgetting(matrix: list[dict], trained_at: dict[str, int], metric: str = "loss") -> dict[str, dict | None]:
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


def backward_transfer(matrix: list[dict], trained_at: dict[str, int], metric: str = "loss") -> float | None:
    """BWT (Lopez-Paz & Ranzato) on a loss: mean over tasks of R[final][j] - R[after its stage][j].
    Positive = the later stages made earlier tasks worse (same sign as forgetting)."""
    final = len(matrix) - 1
    deltas = [matrix[final][t][metric] - matrix[s + 1][t][metric]
              for t, s in trained_at.items() if s + 1 < final]
    return sum(deltas) / len(deltas) if deltas else None
