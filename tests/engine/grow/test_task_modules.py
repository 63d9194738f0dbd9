"""Task-specific modules: each stage's modules belong to its task; activating a task gives back
exactly the function it had when it was trained (zero forgetting when the task is known), modules
save and load per task, and ops that change the shared base are refused with one clear message."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from engine.grow.apply import Freezer, apply_stage
from engine.grow.task_modules import TaskModules
from engine.model.view import ArchView
from engine.ops.adapters import adapter_names
from engine.ops.linear import ConcatLinear, ParallelLinear, WiderInputLinear
from engine.ops.params import OPS, AddHeadsParams, IA3Params, LoRAParams, WidenFFNParams
from engine.ops.width import FFNWithNewUnits
from engine.plan import ExpandSpec, GrowSpec, StageSpec
from engine.plan.checks import stage_problems, task_module_problems
from tests.tiny_models import build, token_batch, train_steps

EVAL = token_batch(seed=99)[0]
EXACT = 1e-6


def logits(model, inputs=EVAL) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=inputs) if not isinstance(model, nn.Sequential) else model(inputs)
    return (out.logits if hasattr(out, "logits") else out).float()


def delta(a, b) -> float:
    return float((a - b).abs().max())


def run_stage(tm, model, view, index, task, specs, batch, freeze="base", train=None):
    """What the trainer does: activate the stage's task, apply its operators (measured), claim
    what they added for the task, freeze, train."""
    tm.activate(model, task)
    growth = apply_stage(model, view, index, [ExpandSpec(**s) for s in specs], batch,
                         torch.Generator().manual_seed(index))
    claimed = tm.claim(task, model, growth, allow_shared=index == 0)
    tm.activate(model, task)
    Freezer().apply(model, freeze, growth)
    (train or train_steps)(model, batch)
    return growth, claimed


def three_tasks(family: str, b_ops=None, c_ops=None):
    """Stage A trains the base on task A; stage B adds B's modules and trains only them; stage C
    adds C's modules and trains only them. Returns the model, view, registry and each task's
    logits right after its stage."""
    model, view = build(family, 2, 2, 8, 16, 0)
    tm = TaskModules()
    seen = {}
    b_ops = b_ops if b_ops is not None else [{"op": "widen_ffn", "size": 4, "mode": "parallel", "init": "zero_out"}]
    c_ops = c_ops if c_ops is not None else [{"op": "lora", "modules": ["q", "v", "up"], "r": 2}]
    for index, (task, ops, freeze) in enumerate([("A", [], "none"), ("B", b_ops, "base"), ("C", c_ops, "base")]):
        run_stage(tm, model, view, index, task, ops, token_batch(seed=index + 1), freeze)
        seen[task] = logits(model)
    return model, view, tm, seen


# ---------------------------------------------------------------------------------------------
# switching


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_activating_a_task_gives_back_its_function(family):
    model, _, tm, seen = three_tasks(family)
    assert tm.tasks() == ["A", "B", "C"]
    assert tm.modules("A") == [] and tm.adapters("A") == []
    blocks = "model.layers" if family == "llama" else "transformer.h"
    assert tm.modules("B") == [f"{blocks}.0.mlp[1]", f"{blocks}.1.mlp[1]"]
    assert tm.adapters("C") == ["lora_stage2"] and tm.modules("C") == []
    # every stage trained something that moved its task's function
    assert delta(seen["B"], seen["A"]) > 1e-3 and delta(seen["C"], seen["A"]) > 1e-3
    for task in ("A", "B", "C", "B", "A", "C"):
        tm.activate(model, task)
        assert tm.active == task
        assert delta(logits(model), seen[task]) == 0.0, task  # the same computation: bit for bit
    tm.activate(model, "D")  # a task that owns nothing (not trained yet): the bare base
    assert delta(logits(model), seen["A"]) <= EXACT
    tm.activate(model, None)  # everything on: B's path and C's adapter together
    both = logits(model)
    assert delta(both, seen["B"]) > 1e-3 and delta(both, seen["C"]) > 1e-3
    assert all(m.active for m in model.modules() if isinstance(m, FFNWithNewUnits))


def test_training_one_task_leaves_the_others_alone():
    """Training C again (freeze = base, new modules) changes nothing for A and B; the trained task's
    modules get gradients only while active."""
    model, view, tm, seen = three_tasks("gpt_neo")
    run_stage(tm, model, view, 3, "C", [{"op": "parallel_linear", "modules": ["o"], "layers": [1]}],
              token_batch(seed=7))
    assert tm.modules("C") == ["transformer.h.1.attn.attention.out_proj[1]"]
    assert tm.adapters("C") == ["lora_stage2"]  # the two C stages accumulate
    for task in ("A", "B"):
        tm.activate(model, task)
        assert delta(logits(model), seen[task]) <= EXACT
    tm.activate(model, "C")
    assert delta(logits(model), seen["C"]) > 1e-3  # C's new path trained


def test_parallel_linear_ia3_and_concat_linear_on_gpt2():
    model, view = build("gpt2", 2, 2, 4, 12, 0)
    tm, seen = TaskModules(), {}
    stages = [("A", [], "none"),
              ("B", [{"op": "parallel_linear", "modules": ["up", "o"]}], "base"),
              ("C", [{"op": "concat_linear", "modules": ["up"], "size": 3, "layers": [0]}], "base"),
              ("D", [{"op": "ia3", "modules": ["k", "v"]}], "base")]
    for index, (task, ops, freeze) in enumerate(stages):
        run_stage(tm, model, view, index, task, ops, token_batch(seed=index + 1), freeze)
        seen[task] = logits(model)
    assert tm.modules("C") == ["transformer.h.0.mlp.c_fc[2]", "transformer.h.0.mlp.c_proj[1]"]
    assert tm.adapters("D") == ["ia3_stage3"]
    assert sorted(tm.state_dict("D")) == [f"transformer.h.{i}.attn.c_attn.ia3_l.ia3_stage3" for i in (0, 1)]
    for task in "ABCD":
        tm.activate(model, task)
        assert delta(logits(model), seen[task]) <= EXACT, task
    tm.activate(model, "A")  # inactive ConcatLinear: the width stays, the new features are zero
    concat = model.transformer.h[0].mlp.c_fc
    assert isinstance(concat, ConcatLinear) and not concat.active
    assert concat(torch.randn(2, 8))[..., -3:].abs().max() == 0


def test_nested_parallel_widening_of_one_ffn_by_two_tasks():
    model, view = build("gpt_neo", 2, 2, 8, 16, 0)
    tm, seen, saved = TaskModules(), {}, {}
    widen = {"op": "widen_ffn", "mode": "parallel", "init": "zero_out"}
    stages = [("A", []), ("B", [{**widen, "size": 3, "layers": [0]}]), ("C", [{**widen, "size": 2}])]
    for index, (task, ops) in enumerate(stages):
        run_stage(tm, model, view, index, task, ops, token_batch(seed=index + 1), "none" if index == 0 else "base")
        seen[task] = logits(model)
        saved[task] = tm.state_dict(task)
    outer = model.transformer.h[0].mlp
    assert isinstance(outer, FFNWithNewUnits) and isinstance(outer.base, FFNWithNewUnits)
    assert tm.modules("B") == ["transformer.h.0.mlp[1]"]  # the inner path keeps its key when wrapped
    assert tm.modules("C") == ["transformer.h.0.mlp[2]", "transformer.h.1.mlp[1]"]
    assert list(tm.state_dict("B")) == list(saved["B"]) == ["transformer.h.0.mlp[1].up.weight",
                                                           "transformer.h.0.mlp[1].up.bias",
                                                           "transformer.h.0.mlp[1].down.weight"]
    for task in ("A", "B", "C", "A", "C", "B"):
        tm.activate(model, task)
        assert delta(logits(model), seen[task]) <= EXACT, task
        assert outer.active == (task == "C") and outer.base.active == (task == "B")


def test_nested_widen_mlp_paths_on_a_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    view = ArchView.of(model)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    y = torch.sin(x.sum(1, keepdim=True)).expand(16, 3).contiguous()

    def train(m, _batch):
        optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05, weight_decay=0)
        for _ in range(3):
            nn.functional.mse_loss(m(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()

    tm, seen = TaskModules(), {}
    widen = {"op": "widen_mlp", "mode": "parallel", "init": "zero_out"}
    stages = [("A", []), ("B", [{**widen, "size": 2}]), ("C", [{**widen, "size": 3, "layers": [0]}])]
    for index, (task, ops) in enumerate(stages):
        tm.activate(model, task)
        growth = apply_stage(model, view, index, [ExpandSpec(**s) for s in ops], (x, y),
                             torch.Generator().manual_seed(index))
        tm.claim(task, model, growth, allow_shared=index == 0)
        Freezer().apply(model, "none" if index == 0 else "base", growth)
        train(model, None)
        with torch.no_grad():
            seen[task] = model(x)
    assert tm.modules("B") == ["0[1]", "2[2]", "2[1]", "4[1]"]  # hidden layer 1 grows out of Linear 2
    assert tm.modules("C") == ["0[2]", "2[3]"]
    for task in ("A", "B", "C", "B", "A"):
        tm.activate(model, task)
        with torch.no_grad():
            assert delta(model(x), seen[task]) <= EXACT, task


# ---------------------------------------------------------------------------------------------
# saving and loading


@pytest.mark.parametrize("task", ["B", "C"])
def test_save_perturb_load_restores_a_task(tmp_path, task):
    model, _, tm, seen = three_tasks("gpt_neo")
    path = tmp_path / f"{task}.safetensors"
    tm.save(task, path)
    state = tm.state_dict(task)
    assert state and all(v.is_contiguous() for v in state.values())
    if task == "C":
        assert all(".lora_A.lora_stage2." in k or ".lora_B.lora_stage2." in k for k in state)
    tm.load_state_dict(task, {k: torch.randn_like(v) for k, v in state.items()})  # perturb
    tm.activate(model, task)
    assert delta(logits(model), seen[task]) > 1e-3
    other = "C" if task == "B" else "B"  # only the task's own tensors changed
    tm.activate(model, other)
    assert delta(logits(model), seen[other]) <= EXACT
    tm.load(task, path)
    tm.activate(model, task)
    assert delta(logits(model), seen[task]) <= EXACT


def test_loading_is_strict():
    _, _, tm, _ = three_tasks("gpt_neo")
    state = tm.state_dict("B")
    key = next(iter(state))
    with pytest.raises(ValueError, match=r"missing \[transformer\.h\.0\.mlp\[1\]\.up\.weight\], unexpected \[\]"):
        tm.load_state_dict("B", {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match=r"unexpected \[nope\]"):
        tm.load_state_dict("B", {**state, "nope": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp\[1\]\.up\.weight: shape \(3,\) does not fit"):
        tm.load_state_dict("B", {**state, key: torch.zeros(3)})
    with pytest.raises(ValueError, match="no task 'Z' — tasks: A, B, C"):
        tm.state_dict("Z")
    assert tm.state_dict("A") == {}  # the base's own task owns nothing


def test_json_record_restores_switching_on_a_rebuilt_model(tmp_path):
    """A checkpoint: the model's tensors plus to_json(); resume rebuilds the model by replaying the
    stages (unmeasured), loads the tensors, restores the registry, and switching works again."""
    model, _, tm, seen = three_tasks("llama")
    record = json.loads(json.dumps(tm.to_json()))
    assert record == {"version": 1, "tasks": {"A": {"modules": [], "adapters": []},
                                              "B": {"modules": ["model.layers.0.mlp[1]", "model.layers.1.mlp[1]"],
                                                    "adapters": []},
                                              "C": {"modules": [], "adapters": ["lora_stage2"]}}}
    rebuilt, view = build("llama", 2, 2, 8, 16, 5)
    for index, ops in enumerate([[], [{"op": "widen_ffn", "size": 4, "mode": "parallel"}],
                                 [{"op": "lora", "modules": ["q", "v", "up"], "r": 2}]]):
        apply_stage(rebuilt, view, index, [ExpandSpec(**s) for s in ops], None,
                    torch.Generator().manual_seed(index), measure=False)
    rebuilt.load_state_dict(model.state_dict())
    restored = TaskModules.from_json(json.dumps(record))
    assert restored.to_json() == record and restored.owner("lora_stage2") == "C"
    for task in ("C", "A", "B"):
        restored.activate(rebuilt, task)
        assert delta(logits(rebuilt), seen[task]) <= EXACT, task

    bare, _ = build("llama", 2, 2, 8, 16, 5)  # not rebuilt: the record does not fit
    with pytest.raises(ValueError, match=r"task 'B' owns model\.layers\.0\.mlp\[1\], which the model does not have"):
        TaskModules.from_json(record).activate(bare, "A")
    with pytest.raises(ValueError, match="not a task-modules record"):
        TaskModules.from_json({"B": []})


# ---------------------------------------------------------------------------------------------
# export follows the active modules


def test_materialize_merges_only_active_paths():
    from engine.exports.hf_directory import materialize

    for task in ("B", "C", None):
        model, _, tm, seen = three_tasks("gpt_neo")
        tm.activate(model, task)
        expected = logits(model)
        materialize(model)
        assert not any(isinstance(m, (FFNWithNewUnits, ParallelLinear)) for m in model.modules())
        assert not adapter_names(model)
        assert delta(logits(model), expected) <= 1e-4, task
        if task is not None:
            assert delta(logits(model), seen[task]) <= 1e-4
        width = model.transformer.h[0].mlp.c_fc.weight.shape[0]
        assert width == (16 if task == "C" else 20)  # C's export has no B units


def test_inactive_linear_paths_materialize_as_their_function():
    base = nn.Linear(4, 3)
    parallel = ParallelLinear(base, nn.Parameter(torch.randn(3, 4)))
    reader = WiderInputLinear(nn.Linear(4, 3), nn.Parameter(torch.randn(3, 2)))
    x, wide_x = torch.randn(5, 4), torch.randn(5, 6)
    for module, inputs in ((parallel, x), (reader, wide_x)):
        module.active = False
        with torch.no_grad():
            assert torch.allclose(module.materialize()(inputs), module(inputs), atol=1e-6)
    assert torch.equal(parallel(x), base(x))
    assert "active=False" in repr(parallel)


# ---------------------------------------------------------------------------------------------
# what can be a task module


def test_supported_and_refused_ops():
    assert {n for n, d in OPS.items() if d.task_module} >= {"lora", "ia3", "widen_ffn", "widen_mlp", "parallel_linear"}
    assert task_module_problems(LoRAParams()) == []
    assert task_module_problems(IA3Params()) == []
    assert task_module_problems(WidenFFNParams(size=4)) == []  # parallel is the default
    assert task_module_problems({"op": "widen_ffn", "size": 4}) == []
    assert task_module_problems(ExpandSpec(op="parallel_linear", modules=["o"])) == []
    (field, message), = task_module_problems(WidenFFNParams(size=4, mode="inplace"))
    assert field == "mode"
    assert message.startswith('task_modules needs mode = "parallel" (in-place widening changes the shared base')
    (field, message), = task_module_problems({"op": "widen_mlp", "size": 2, "mode": "inplace"})
    assert field == "mode" and 'set mode = "parallel" on this widen_mlp' in message
    for spec in (AddHeadsParams(size=2), {"op": "widen_hidden", "size": 8}, {"op": "insert_identity"},
                 {"op": "map_layers", "mapping": [0, 0, 1]}, {"op": "split_residual"}, {"op": "unshare"}):
        (field, message), = task_module_problems(spec)
        op = spec["op"] if isinstance(spec, dict) else spec.op
        assert field == "op" and message.startswith(f"{op} changes the shared base"), message
        assert "set task_modules = false" in message
    assert task_module_problems({"op": "no_such_op"}) == []  # the plan checker's own error


def test_stage_problems_keep_the_base_frozen_after_the_first_stage():
    first = {"task": "a", "steps": 1, "expand": [{"op": "widen_ffn", "size": 4, "mode": "inplace"}]}
    assert stage_problems(0, first) == []  # the first stage builds the base
    later = {"task": "b", "steps": 1, "freeze": "none",
             "expand": [{"op": "lora"}, {"op": "widen_ffn", "size": 4, "mode": "inplace"}],
             "grow": {"expand": [{"op": "add_heads", "size": 2}]}}
    problems = stage_problems(1, later)
    assert [f for f, _ in problems] == ["freeze", "expand[1].mode", "grow.expand[0].op"]
    assert 'set freeze = "base"' in problems[0][1]
    assert stage_problems(2, {**later, "freeze": "base", "expand": [{"op": "lora"}], "grow": None}) == []
    spec = StageSpec(task="b", steps=1, expand=[ExpandSpec(op="widen_ffn", size=4, mode="inplace")],
                     grow=GrowSpec(expand=[ExpandSpec(op="lora")]))  # the plan's own objects
    assert [f for f, _ in stage_problems(1, spec)] == ["freeze", "expand[0].mode"]


def test_claim_refuses_changes_to_the_shared_base():
    model, view = build("gpt_neo", 2, 2, 8, 16, 0)
    tm = TaskModules()
    first = apply_stage(model, view, 0, [ExpandSpec(op="widen_ffn", size=2, mode="inplace"),
                                         ExpandSpec(op="lora", modules=["q"], r=2, layers=[0])], None,
                        torch.Generator().manual_seed(0), measure=False)
    claimed = tm.claim("A", model, first, allow_shared=True)  # the first stage: in-place growth is base
    assert claimed["adapters"] == ["lora_stage0"] and claimed["modules"] == [] and claimed["params"] > 0
    later = apply_stage(model, view, 1, [ExpandSpec(op="widen_ffn", size=2, mode="inplace")], None,
                        torch.Generator().manual_seed(1), measure=False)
    with pytest.raises(ValueError, match=r"task_modules: task 'B' would change the shared base \(transformer\.h\.0"):
        tm.claim("B", model, later)
    deeper = apply_stage(model, view, 2, [ExpandSpec(op="insert_identity", layers=[0])], None,
                         torch.Generator().manual_seed(2), measure=False)
    with pytest.raises(ValueError, match="would change the shared base"):
        tm.claim("B", model, deeper)
    joined = apply_stage(model, view, 3, [ExpandSpec(op="lora", modules=["q"], r=2, layers=[2], name="lora_stage0")],
                         None, torch.Generator().manual_seed(3), measure=False)
    with pytest.raises(ValueError, match="adapter 'lora_stage0' already belongs to task 'A', not 'B' — give"):
        tm.claim("B", model, joined)
