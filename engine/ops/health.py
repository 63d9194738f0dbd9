"""Health of new units: can they learn, and do they stay distinct?

The on-the-fly-expansion note's failure modes, measured: all-zero units get no gradient (dead);
constant units get identical gradients and never diverge; copied-and-halved units (Net2Net twins
without noise) stay equal to their source. Each new hidden unit is described by its incoming
row and outgoing column; similarity is the cosine between those concatenated vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _whole(param) -> torch.Tensor:
    """A parameter's values, whole: a sharded one (FSDP's DTensor) is gathered — one layer's
    tensor at a time, a collective every rank joins."""
    value = param.detach()
    return value.full_tensor() if hasattr(value, "full_tensor") else value


@dataclass
class NewUnits:
    """One layer's new hidden units: their rows of `up` and columns of `down` (Linear layout;
    `conv1d` for GPT-2's transposed storage). `sources` names the unit each one copies, if any.

    Fused 3-D expert tensors (a MoE block): `expert` picks one expert's matrices out of
    [experts, ...] (one NewUnits per expert); `up_stride` 2 where gate and up rows interleave
    (GPT-OSS), so unit j's incoming row (its gate's) is 2j."""

    up: torch.nn.Parameter
    down: torch.nn.Parameter
    rows: torch.Tensor
    conv1d: bool = False
    sources: torch.Tensor | None = None
    expert: int | None = None
    up_stride: int = 1

    def _vectors(self, up: torch.Tensor, down: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.expert is not None:
            up, down = up[self.expert], down[self.expert]
        incoming = (up.T if self.conv1d else up)[rows * self.up_stride]  # [units, hidden]
        outgoing = (down if self.conv1d else down.T)[rows]               # [units, hidden]
        return torch.cat([incoming, outgoing], dim=1).float()

    def vectors(self) -> torch.Tensor:
        return self._vectors(_whole(self.up), _whole(self.down), self.rows)

    def source_vectors(self) -> torch.Tensor | None:
        if self.sources is None:
            return None
        return self._vectors(_whole(self.up), _whole(self.down), self.sources)

    def grad_vectors(self) -> torch.Tensor | None:
        if self.up.grad is None or self.down.grad is None:
            return None
        return self._vectors(_whole(self.up.grad), _whole(self.down.grad), self.rows)


def dead_share(groups: list[NewUnits]) -> float | None:
    """Share of new units whose every weight has a zero gradient (call after a backward)."""
    dead = total = 0
    for group in groups:
        grads = group.grad_vectors()
        if grads is None:
            continue
        dead += int((grads.abs().amax(dim=1) == 0).sum())
        total += grads.shape[0]
    return dead / total if total else None


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def max_pairwise_cosine(groups: list[NewUnits]) -> float | None:
    """Largest cosine similarity between two new units of the same layer (1.0 = identical)."""
    best = None
    for group in groups:
        v = group.vectors()
        if v.shape[0] < 2:
            continue
        sim = _cosine(v, v)
        sim.fill_diagonal_(-1.0)
        best = max(best if best is not None else -1.0, float(sim.max()))
    return best


def max_twin_cosine(groups: list[NewUnits]) -> float | None:
    """Largest cosine between a copied unit and the unit it copies (Net2Net / copy-halve twins)."""
    best = None
    for group in groups:
        sources = group.source_vectors()
        if sources is None:
            continue
        sim = (_cosine(group.vectors(), sources)).diagonal()
        best = max(best if best is not None else -1.0, float(sim.max()))
    return best


def similarity_report(groups: list[NewUnits]) -> dict:
    return {"max_pairwise_cosine": max_pairwise_cosine(groups), "max_twin_cosine": max_twin_cosine(groups)}


# A copy whose [incoming, outgoing] weights keep a cosine above this with its source's after the
# stage trained still computes its source's feature: the growth added width that does not learn.
TWIN_WARNING = 0.99


def twin_warning(report: dict, figures: dict, threshold: float = TWIN_WARNING) -> str | None:
    """The warning for an expansion whose copies are still twins after training, or None."""
    twin = figures.get("max_twin_cosine")
    if twin is None or twin <= threshold:
        return None
    what = f"growth {report['growth']} ({report['op']})" if report.get("growth") is not None else report["op"]
    symmetry = report.get("settings", {}).get("symmetry")
    fix = ('set symmetry = "noise" on the operator' if symmetry in (None, "none")
           else "raise symmetry_scale" if symmetry == "noise"
           else "raise symmetry_scale or use symmetry = \"noise\"")
    return (f"stage {report['stage']}: {what}'s new units stayed twins of their sources after training "
            f"(max twin cosine {twin:.4f} > {threshold}) — they add width that learns nothing new; {fix}")


def after_training(expansions: list[dict], growth, index: int) -> list[tuple[dict, dict]]:
    """After stage `index` trained: do its new units still differ from each other and their
    sources? Adds ``after_training`` to each of the stage's expansion reports that has units;
    returns (report, figures) for each."""
    reports = [r for r in expansions if r["stage"] == index]
    out = []
    for report, result in zip(reports, growth.results):
        if result.units:
            report["after_training"] = similarity_report(result.units)
            out.append((report, report["after_training"]))
    return out
