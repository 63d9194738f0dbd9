"""The divergence check reads the device once per window (engine.train.divergence.DivergenceWatch):
adding a step reads nothing back, and a check names the window's first bad step, as the per-step
check did."""

from __future__ import annotations

import math

import pytest
import torch

from engine.train.divergence import DIVERGED_LOSS_FACTOR, Diverged, DivergenceWatch

VOCAB = 259


def watched(losses, norms=None) -> DivergenceWatch:
    watch = DivergenceWatch(stage=1, run_id="r")
    for step, loss in enumerate(losses):
        norm = None if norms is None else torch.tensor(norms[step])
        watch.add(torch.tensor(loss), norm, VOCAB, step)
    return watch


def test_adding_a_step_reads_nothing_back_from_the_device(monkeypatch):
    reads = []
    for name in ("__bool__", "__float__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    watch = watched([2.0, 2.1, 2.2], [1.0, 1.0, 1.0])
    assert reads == []
    watch.check()
    assert reads == ["__bool__"]  # the window's one read


def test_a_good_window_passes_and_is_forgotten():
    watch = watched([2.0, 2.5, 3.0], [1.0, 2.0, 3.0])
    watch.check()
    watch.add(torch.tensor(float("inf")), None, VOCAB, 7)
    with pytest.raises(Diverged, match="stage 1 step 7: the loss is inf"):
        watch.check()


@pytest.mark.parametrize("losses, norms, message", [
    ([2.0, float("nan"), float("inf")], None, "step 1: the loss is nan"),
    ([2.0, 2.0, 1e6], None, f"step 2: the loss is 1e\\+06, above {DIVERGED_LOSS_FACTOR:g}·ln\\(vocab {VOCAB}\\)"),
    ([2.0, 2.0, 2.0], [1.0, float("nan"), 1.0], "step 1: the gradient norm is nan"),
])
def test_the_first_bad_step_of_the_window_is_named(losses, norms, message):
    with pytest.raises(Diverged, match=message):
        watched(losses, norms).check()


def test_the_bound_is_a_multiple_of_guessing_uniformly():
    bound = DIVERGED_LOSS_FACTOR * math.log(VOCAB)
    watched([bound]).check()
    with pytest.raises(Diverged):
        watched([bound * 1.001]).check()
