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
    for name in ("__bool__", "__float__", "item", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    watch = watched([2.0, 2.1, 2.2], [1.0, 1.0, 1.0])
    assert reads == []
    assert watch.check() == pytest.approx(2.2)  # the last step's loss, for the step event
    assert reads[0] == "cpu" and "cpu" not in reads[1:]  # one copy back; the rest reads that copy


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


def test_the_step_loop_reads_the_device_once_per_log_interval(tmp_path, monkeypatch):
    """A real stage of 24 steps logged every 12: the loop's own code reads tensors back twice,
    with the window's check (whose copy also gives the logged loss)."""
    import traceback
    from collections import Counter

    import tomli_w

    from engine.plan import plan_from_dict
    from engine.train.loop import Trainer
    from widen_tui.launcher import create_run

    raw = {"name": "reads", "seed": 0, "model": {"source": "builtin:tiny-neo", "tokenizer": "bytes"},
           "tasks": {"prose": {"source": "builtin:pydoc", "eval_fraction": 0.2}},
           "train": {"batch_size": 2, "seq_len": 16, "log_interval": 12, "eval_interval": 0, "eval_batches": 1,
                     "device": "cpu"},
           "stages": [{"name": "prose", "task": "prose", "steps": 24}]}
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(tomli_w.dumps(raw))
    run = create_run(plan_from_dict(raw), plan_path, tmp_path / "runs")
    trainer, reads, counting = Trainer(run.path), Counter(), [False]
    for name in ("__bool__", "__float__", "item", "tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = traceback.extract_stack()[-2]  # widen's own code, not torch's optimizers
            if counting[0] and "/engine/" in caller.filename:
                reads[(_name, caller.filename.rsplit("/", 1)[-1])] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    train_steps = trainer.train_steps

    def counted_steps(*args, **kwargs):
        counting[0] = True
        try:
            return train_steps(*args, **kwargs)
        finally:
            counting[0] = False

    trainer.train_steps = counted_steps
    trainer.run_plan()
    assert run.status()["state"] == "done"
    device_reads = {key: n for key, n in reads.items() if key != ("__bool__", "divergence.py")
                    and key != ("__float__", "divergence.py")}  # those read the window's host copy
    assert device_reads == {("cpu", "divergence.py"): 2}
