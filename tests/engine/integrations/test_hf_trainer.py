"""GrowthCallback in a real transformers.Trainer: a plateau growth, AdamW state carried, the run
written as a widen run that `widen runs` lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")  # transformers.Trainer needs it (pinned in constraints.txt)

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from engine.integrations.hf import GrowthCallback, GrowthSettingsError, TaskModulesCallback  # noqa: E402
from engine.plan import TaskSpec  # noqa: E402
from engine.runs.events import read_all  # noqa: E402
from engine.runs.records import GenericEvent  # noqa: E402
from engine.train.data import ByteTokenizer, list_documents  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SEQ = 64
CHECK = 4     # steps per plateau check


class Windows(torch.utils.data.Dataset):
    """Fixed next-byte windows of the built-in prose corpus (the Trainer shuffles them)."""

    def __init__(self, ids: torch.Tensor, count: int, offset: int = 0):
        self.ids, self.count, self.offset = ids, count, offset

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        start = self.offset + (SEQ + 1) * i
        window = self.ids[start:start + SEQ]
        return {"input_ids": window, "labels": window}


@pytest.fixture(scope="module")
def prose_ids() -> torch.Tensor:
    docs = list_documents(TaskSpec(source="builtin:pydoc"), "tasks.prose")
    text = "\n".join(t for _, t in docs[:20])
    return torch.as_tensor(ByteTokenizer().encode(text), dtype=torch.long)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def make_trainer(model, tmp_path, steps: int, train, eval_dataset=None, **extra) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=8,
                             per_device_eval_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
                             weight_decay=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=eval_dataset)
    trainer.remove_callback(PrinterCallback)  # no log dicts on stdout
    return trainer


def test_plateau_growth_in_a_trainer(prose_ids, tmp_path, widen_home):
    model = tiny_llama()
    trainer = make_trainer(model, tmp_path, 48, Windows(prose_ids, 256),
                           eval_dataset=Windows(prose_ids, 8, offset=(SEQ + 1) * 300), eval_strategy="steps",
                           eval_steps=16)
    growth = GrowthCallback([{"op": "widen_ffn", "size": 64, "init": "net2net"}], trigger="plateau", patience=1,
                            threshold=0.05, check_interval=CHECK, warmup_checks=2, cooldown=0,
                            run_dir=True, run_name="hf-plateau", bytes_per_token=1.0)
    growth.attach(trainer)
    trainer.train()

    # one growth, at a plateau check, preserving the function
    assert len(growth.reports) == 1, [e for e in trainer.state.log_history if "loss" in e]
    report = growth.reports[0]
    at = report["step"]
    assert report["trigger"] == "plateau" and at % CHECK == 0 and 0 < at < 48
    assert report["params_added"] == 2 * 64 * 64 * 3  # two layers, 64 units, gate/up/down rows of d_model 64
    assert report["max_abs_logit_delta"] <= 1e-4
    assert abs(report["loss_before"] - report["loss_after"]) <= 1e-4

    # the loss keeps falling: the mean of the last losses < the mean of the check that triggered
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e and "step" in e}
    at_growth = sum(losses[s] for s in range(at - CHECK + 1, at + 1)) / CHECK
    last = [losses[s] for s in range(41, 49)]
    assert sum(last) / len(last) < at_growth, (at_growth, last)
    logged = [e for e in trainer.state.log_history if "widen/params_added" in e]
    assert len(logged) == 1 and logged[0]["step"] == at and logged[0]["widen/max_abs_logit_delta"] <= 1e-4

    # the optimizer is the rebuilt one, over the grown tensors, with their carried state
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    up = model.model.layers[0].mlp.up_proj.weight
    assert up.shape == (128 + 64, 64) and id(up) in in_optimizer
    state = optimizer.state[up]
    assert float(state["step"]) == 48  # carried: the step count went on from before the growth
    assert state["exp_avg_sq"][128:].abs().sum() > 0  # the split units' moments were carried, not zeros
    assert growth.carried[0]["split"] > 0 and growth.carried[0]["fresh"] == 0 and growth.carried[0]["unplaced"] == []
    assert trainer.lr_scheduler.optimizer is trainer.optimizer

    # the run directory: schema-valid events; `widen runs` lists it, done
    run_dirs = [p for p in widen_home.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(run_dirs) == 1
    events = read_all(run_dirs[0] / "events.jsonl")
    assert not any(isinstance(e, GenericEvent) for e in events)  # every event of a known type
    kinds = [e.type for e in events]
    assert kinds[0] == "start" and kinds[-1] == "status" and events[-1].state == "done"
    expands = [e for e in events if e.type == "expand"]
    assert len(expands) == 1 and expands[0].trigger == "plateau" and expands[0].step == at
    assert kinds.count("step") == 48 and kinds.count("eval") == 3
    env = dict(os.environ, WIDEN_HOME=str(widen_home))
    widen = str(Path(sys.executable).with_name("widen"))
    proc = subprocess.run([widen, "runs", "--json"], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert [(r["id"], r["name"], r["state"]) for r in records] == [(run_dirs[0].name, "hf-plateau", "done")]
    assert records[0]["summary"]["growths"] == 1
    show = subprocess.run([widen, "show", run_dirs[0].name, "--json"], capture_output=True, text=True, timeout=60,
                          env=env, cwd=ROOT)
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["results"]["expansions"][0]["max_abs_logit_delta"] <= 1e-4


def test_at_steps_growth_and_bad_settings(prose_ids, tmp_path):
    model = tiny_llama()
    trainer = make_trainer(model, tmp_path, 8, Windows(prose_ids, 64))
    growth = GrowthCallback([{"op": "widen_ffn", "size": 16}], trigger="at", at_steps=[3, 5]).attach(trainer)
    trainer.train()
    assert [r["step"] for r in growth.reports] == [3, 5]
    assert all(r["max_abs_logit_delta"] <= 1e-4 for r in growth.reports)
    # parallel zero-init paths: new parameters, fresh state, the old ones' moved
    assert growth.carried[1]["fresh"] > 0 and growth.carried[1]["moved"] > 0


    # optimizer_state = "reset": after the growth the Trainer's AdamW starts fresh (torch's step
    # counts begin again), where the carry above kept each old tensor's step
    model = tiny_llama()
    trainer = make_trainer(model, tmp_path / "reset", 6, Windows(prose_ids, 64))
    GrowthCallback([{"op": "widen_ffn", "size": 16}], trigger="at", at_steps=[3], optimizer_state="reset").attach(trainer)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert {float(s["step"]) for s in optimizer.state.values() if s} == {3.0}  # steps 4..6 only

    with pytest.raises(GrowthSettingsError, match=r"grow\.expand\.0\.sise: unknown key — did you mean 'size'\?"):
        GrowthCallback([{"op": "widen_ffn", "sise": 16}], trigger="at", at_steps=[3])
    with pytest.raises(GrowthSettingsError, match=r"grow\.at_steps"):
        GrowthCallback([{"op": "widen_ffn", "size": 16}], trigger="at", at_steps=[5, 3])


def test_task_modules_callback_switches_per_eval_dataset(prose_ids, tmp_path):
    import engine

    model = tiny_llama()
    tasks = engine.TaskModules(model)
    tasks.own("prose")
    for task, seed in (("code", 1), ("docs", 2)):
        report = engine.expand(model, "widen_ffn", size=8, init="random", mode="parallel", seed=seed)
        tasks.own(task, report)
    evals = {"code": Windows(prose_ids, 8), "docs": Windows(prose_ids, 8), "prose": Windows(prose_ids, 8)}
    trainer = make_trainer(model, tmp_path, 1, Windows(prose_ids, 8), eval_dataset=evals)
    callback = TaskModulesCallback(tasks).attach(trainer)
    metrics = trainer.evaluate()
    # each dataset evaluated on its task's own modules: the same data, three different models
    losses = [metrics[f"eval_{t}_loss"] for t in ("code", "docs", "prose")]
    assert len(set(round(x, 6) for x in losses)) == 3
    assert [t for t in callback.switched if t is not None] == ["code", "docs", "prose"]
    tasks.switch("docs")
    direct = make_trainer(model, tmp_path, 1, Windows(prose_ids, 8), eval_dataset=Windows(prose_ids, 8)).evaluate()
    assert direct["eval_loss"] == pytest.approx(metrics["eval_docs_loss"], abs=1e-6)
