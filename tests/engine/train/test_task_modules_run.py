"""Task-specific modules in a run: every task evaluated with its own modules over the shared
frozen base has zero forgetting; each task's modules are saved on their own; a generation task
(docstring -> code) trains on its continuations and gets its exact match and BLEU-4."""

from __future__ import annotations

import textwrap

import pytest

from engine.plan import load_plan
from engine.train.loop import Trainer
from widen_tui.launcher import create_run

pytestmark = pytest.mark.slow

PLAN = textwrap.dedent("""
    name = "tiny-task-modules"
    seed = 1
    task_modules = true

    [model]
    source = "builtin:tiny-neo"

    [tasks.prose]
    source = "builtin:pydoc"
    eval_fraction = 0.2

    [tasks.python]
    source = "builtin:stdlib-python"
    max_docs = 40

    [tasks.docs2code]
    source = "builtin:docstring-code"
    max_docs = 300
    generate_examples = 2
    max_new_tokens = 8

    [train]
    batch_size = 4
    seq_len = 64
    lr = 3e-3
    eval_interval = 0
    eval_batches = 1
    log_interval = 2
    device = "cpu"

    [[stages]]
    task = "prose"
    steps = 4

    [[stages]]
    task = "python"
    steps = 4
    freeze = "base"
    [[stages.expand]]
    op = "widen_ffn"
    size = 16

    [[stages]]
    task = "docs2code"
    steps = 4
    freeze = "base"
    [[stages.expand]]
    op = "lora"
    r = 4
""")


def test_known_tasks_forget_nothing_with_their_own_modules(tmp_path, widen_home):
    path = tmp_path / "plan.toml"
    path.write_text(PLAN)
    run = create_run(load_plan(path), path, widen_home)
    Trainer(run.path).run_plan()
    results = run.results()
    tasks, bpb = results["matrix"]["tasks"], results["matrix"]["bpb"]
    prose, python, gen = (tasks.index(t) for t in ("prose", "python", "docs2code"))
    # rows: initial, after prose, after python, after docs2code
    assert bpb[3][prose] == pytest.approx(bpb[1][prose], abs=1e-6)
    assert bpb[3][python] == pytest.approx(bpb[2][python], abs=1e-6)
    forgetting = results["forgetting"]["bpb"]
    assert abs(forgetting["prose"]["absolute"]) < 1e-6 and abs(forgetting["python"]["absolute"]) < 1e-6
    assert bpb[3][gen] < bpb[2][gen]                       # its own LoRA learned something
    # the generation task's own metrics, every row
    assert all(0.0 <= row[gen] <= 1.0 for row in results["matrix"]["exact_match"])
    assert all(0.0 <= row[gen] <= 100.0 for row in results["matrix"]["bleu"])
    assert results["matrix"]["bleu"][0][prose] is None     # text tasks have no generation score
    # each task's modules saved on their own
    saved = run.checkpoints / "latest" / "tasks"
    assert sorted(p.name for p in saved.iterdir()) == ["docs2code.safetensors", "python.safetensors"]
