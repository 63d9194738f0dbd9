"""The parameter preview runs the plan's own operators on a model built on the meta device: its
figures equal what a real build measures, on every family of the registry and every operator;
the builder talks to it through a helper process (latest request wins, bad input one answer)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engine.grow.preview import NOT_META_SAFE, PlanPreview, from_json, preview_plan, to_json
from engine.model.families import FAMILIES, family_named
from engine.ops.params import FFN_ROLES, OPS
from tests.tiny_models import tiny_config
from widen_tui.tui.preview_client import PreviewClient

ROOT = Path(__file__).resolve().parents[3]
BYTES_VOCAB = 259  # the byte tokenizer's ids: the saved models must embed them all

# Two stages of operators for a 3-block decoder (hidden 16, 4 heads, FFN 24): stage 0 trains what it
# adds (freeze = "base"), stage 1 freezes by name globs and grows on a plateau.
DECODER_STAGES = [
    ("base", [
        {"op": "add_heads", "size": 4},
        {"op": "widen_ffn", "size": 5, "layers": [0]},
        {"op": "widen_ffn", "size": 3, "mode": "inplace"},
        {"op": "lora", "modules": ["q", "k", "v", "o", "up", "down"], "r": 2, "layers": [1]},
        {"op": "map_layers", "mapping": [0, 1, 1, 2, 0], "kinds": ["real", "real", "virtual", "real", "real"]},
        {"op": "ia3", "layers": [2, 4]},
    ]),
    (["*.0.*", "*embed*", "*wte*", "*shared*"], [
        {"op": "insert_identity", "layers": [0]},
        {"op": "concat_linear", "size": 4, "layers": [0, 1]},
        {"op": "parallel_linear", "modules": ["o", "up"], "layers": [4]},
        {"op": "unshare"},
        {"op": "split_residual", "layers": [3], "k": 2},
    ]),
]
T5_STAGES = [
    ("base", [
        {"op": "widen_ffn", "size": 5}, {"op": "lora", "modules": ["q", "o", "up"], "r": 2},
        {"op": "map_layers", "mapping": [0, 1, 1], "stack": "encoder"},
    ]),
    (["*block.0.*"], [
        {"op": "insert_identity", "layers": [0], "stack": "decoder"}, {"op": "ia3"}, {"op": "unshare"},
    ]),
]
GROWTH = [{"op": "widen_ffn", "size": 2, "mode": "inplace"}]
# the ops the preview cannot run yet, as each family would take them
UNSAFE_OPS: dict = {}


def _model_dir(family: str, tmp_path: Path) -> Path:
    """A tiny random model of `family`, saved with its weights (a local directory: the same path as
    a hub name)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, T5Config

    torch.manual_seed(0)
    if family == "t5":
        config = T5Config(vocab_size=BYTES_VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3,
                          num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        config = tiny_config(family, 3, 4, 4, 24)
        config.vocab_size = BYTES_VOCAB
        model = AutoModelForCausalLM.from_config(config)
    path = tmp_path / family
    model.save_pretrained(path)
    return path


def _plan(source: str, stages, growth=None) -> dict:
    raw = {"name": "parity", "seed": 3, "model": {"source": source},
           "tasks": {"prose": {"source": "builtin:pydoc", "eval_fraction": 0.2}},
           "train": {"batch_size": 2, "seq_len": 16, "device": "cpu"}, "stages": []}
    for freeze, ops in stages:
        raw["stages"].append({"task": "prose", "steps": 0, "freeze": freeze, "expand": copy.deepcopy(ops)})
    raw["stages"][-1]["grow"] = {"max_growths": 3, "expand": copy.deepcopy(GROWTH if growth is None else growth)}
    return raw


def _fits(family, raw: dict) -> bool:
    schema = OPS[raw["op"]].schema
    return family.kind in schema.model_kinds and family.refusal(raw["op"]) is None


def _for_family(family, raw: dict) -> dict:
    """`raw` as a MoE family takes it: expert widths in multiples of 4 (torch's grouped_mm wants
    16-byte strides) and no FFN roles (IA3 and parallel_linear take no expert tensors, and LoRA on
    them would stop the plan's later widen_ffn: tests/engine/ops/test_ops_adapters.py previews
    that); others: as it is."""
    if family.moe is None:
        return raw
    raw = dict(raw)
    if raw["op"] == "widen_ffn":
        raw["size"] = -(-raw["size"] // 4) * 4
    if raw["op"] in ("lora", "ia3", "parallel_linear"):
        modules = raw.get("modules", OPS[raw["op"]].schema.model_fields["modules"].default)
        raw["modules"] = [m for m in modules if m not in FFN_ROLES]
    return raw


def _measured(raw: dict, tmp_path: Path):
    """build_from_plan's reports, then one growth of the last stage on the built model."""
    from engine.grow.growth import grow_model, growth_generator
    from engine.model.view import count_params
    from engine.plan import load_plan
    from engine.train.build import build_from_plan
    from widen_tui.tui.plan_draft import to_toml

    path = tmp_path / "plan.toml"
    path.write_text(to_toml(raw))
    plan = load_plan(path)
    model, view, _, reports = build_from_plan(plan)
    last = len(plan.stages) - 1
    before = count_params(model)
    grow_model(model, view, plan.stages[last].grow.expand, last, 0, None, growth_generator(plan.seed, last, 0))
    return reports, count_params(model) - before


FAMILY_NAMES = [f.name for f in FAMILIES if f.kind in ("causal_lm", "seq2seq")]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_meta_preview_equals_build_from_plan_on_every_family(name, tmp_path, widen_home):
    """Per operator, the preview's `added` is build_from_plan's measured params_added; per stage,
    the total and the trainable count (freeze = "base" and name globs) are the run's; a growth's
    figure is what one growth adds."""
    family = family_named(name)
    stages = [(freeze, [_for_family(family, op) for op in ops if _fits(family, op)]) for freeze, ops in
              (T5_STAGES if name == "t5" else DECODER_STAGES)]
    raw = _plan(str(_model_dir(name, tmp_path)), stages, [_for_family(family, op) for op in GROWTH])
    preview = preview_plan(copy.deepcopy(raw))
    assert preview.error == "", preview.error
    reports, grown = _measured(raw, tmp_path)

    ops = [op for stage in preview.stages for op in stage.ops if ".grow." not in op.path]
    assert [(r["op"], r["params_added"]) for r in reports] == [(op.op, op.added) for op in ops]
    assert preview.base_total == reports[0]["params_before"]
    for index, stage in enumerate(preview.stages):
        last = [r for r in reports if r["stage"] == index][-1]
        assert (stage.total_after, stage.trainable) == (last["params_after"], last["trainable"]), stage.path
    growth = [op for op in preview.stages[-1].ops if ".grow." in op.path]
    assert [op.added for op in growth] == [grown] and "up to 3 growths" in growth[0].note


def test_every_operator_is_previewed_or_says_why():
    """Each operator of OPS either runs in some family's parity plan above, or is one the
    preview cannot run yet: then it shows "?" with the reason, on every family that takes it."""
    covered = {op["op"] for _, ops in DECODER_STAGES + T5_STAGES for op in ops} | {g["op"] for g in GROWTH}
    covered.add("widen_mlp")  # the built-in MLP: tests/widen_tui/tui/test_tui_builder.py (build_from_plan parity)
    covered.add("widen_hidden")  # its own parity test below (it needs a model without wrappers)
    covered |= {"upcycle", "add_experts"}  # a dense model's FFNs: tests/engine/ops/test_ops_experts.py
    assert set(OPS) - covered == set(NOT_META_SAFE)
    raw = {"model": {"source": "builtin:tiny-neo"}, "stages": [{"task": "t", "expand": list(UNSAFE_OPS.values())}]}
    for op in preview_plan(raw).stages[0].ops:
        assert op.added is None and op.note.startswith(NOT_META_SAFE[op.op]), op


def test_mlp_and_json_round_trip():
    raw = {"model": {"source": "builtin:mlp"},
           "stages": [{"task": "t", "freeze": "base", "expand": [{"op": "widen_mlp", "size": 4}]}]}
    preview = preview_plan(raw)
    # hidden layer 0: 4 units reading 64 (+ bias), read by 128; layer 1: reading 128 + layer 0's 4 new, read by 259
    assert preview.stages[0].ops[0].added == 4 * (64 + 1 + 128) + 4 * (132 + 1 + 259)
    assert from_json(json.loads(json.dumps(to_json(preview)))) == preview


def test_a_broken_plan_or_config_is_one_line():
    assert preview_plan({"model": {"source": "/no/such/dir"}}).error_field == "source"
    bad = preview_plan({"model": {"source": 3}})
    assert bad.base_total is None and "\n" not in bad.error and bad.error.startswith("model:")
    odd = preview_plan({"stages": [3, {"expand": [{"op": "nope"}, 7]}], "variants": "x"})
    assert [(op.op, op.added, op.note) for op in odd.stages[0].ops] == [("nope", None, "unknown op"),
                                                                        ("?", None, "unknown op")]


def test_a_seven_billion_parameter_config_previews_without_storage(tmp_path):
    """A Llama-2-7B-shaped config (no weights): built on meta, widened and deepened, in seconds."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    raw = {"model": {"source": str(tmp_path)}, "stages": [{"task": "t", "freeze": "base", "expand": [
        {"op": "widen_ffn", "size": 1024, "mode": "inplace"}, {"op": "insert_identity", "layers": [0, 15, 31]}]}]}
    preview = preview_plan(raw)
    assert preview.base_total == 6_738_415_616
    widen, deepen = preview.stages[0].ops
    assert widen.added == 32 * 1024 * 3 * 4096
    per_block = 4 * 4096 * 4096 + 3 * 4096 * (11008 + 1024) + 2 * 4096
    assert deepen.added == 3 * per_block
    assert preview.stages[0].trainable == widen.added + deepen.added


SEVEN_B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def test_plan_show_counts_a_seven_billion_config_directory_on_meta(tmp_path):
    """`widen plan show` on a directory with a config and no weights (SOLAR's depth up-scaling of a
    7B Llama: 32 -> 48 blocks, 16 real copies) prints the exact counts, as the builder does."""
    (tmp_path / "config.json").write_text(json.dumps(SEVEN_B))
    plan = tmp_path / "plan.toml"
    plan.write_text(f'name = "dus"\n[model]\nsource = "{tmp_path}"\ntokenizer = "bytes"\n'
                    '[tasks.t]\nsource = "builtin:stdlib-python"\n[[stages]]\ntask = "t"\nsteps = 1\n'
                    '[[stages.expand]]\nop = "map_layers"\ndus = { copies = 2, drop = 8 }\nkinds = "real"\n')
    widen = [sys.executable, "-m", "widen_tui.cli", "plan", "show", str(plan)]
    shown = subprocess.run([*widen, "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    per_block = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert data["base_total"] == 6_738_415_616
    [stage] = data["stages"]
    assert stage["ops"][0]["added"] == 16 * per_block and stage["total_after"] == 6_738_415_616 + 16 * per_block
    table = subprocess.run(widen, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "holds a config but no weights" in table.stdout and f"{16 * per_block:+,}" in table.stdout


# -- the helper process and its client ------------------------------------------------------------


def _helper(lines: list[str]) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "engine.grow.preview_worker"], input="".join(lines), capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_the_helper_answers_every_line_and_survives_bad_input():
    plan = {"model": {"source": "builtin:tiny-neo"}, "stages": [{"task": "t", "expand": [{"op": "widen_ffn",
                                                                                          "size": 8, "layers": [0]}]}]}
    answers = _helper(["not json\n", "[1, 2]\n", json.dumps({"id": 5, "plan": plan}) + "\n"])
    assert len(answers) == 3 and answers[-1]["id"] == 5
    assert all(a.get("skipped") or "error" in a for a in answers[:2])  # stale or bad: one answer each, no crash
    assert from_json(answers[-1]["preview"]).stages[0].ops[0].added == 8 * 257


SLOW_HELPER = textwrap.dedent("""
    import json, sys, time
    for line in sys.stdin:
        message = json.loads(line)
        if message["plan"].get("die"):
            sys.exit(3)
        time.sleep(message["plan"].get("sleep", 0))
        preview = {"base_total": message["plan"]["n"], "error": "", "error_field": "", "stages": []}
        print(json.dumps({"id": message["id"], "preview": preview}), flush=True)
""")


def test_the_latest_request_wins_and_a_dead_helper_restarts(tmp_path):
    import threading

    script = tmp_path / "slow.py"
    script.write_text(SLOW_HELPER)
    client = PreviewClient([sys.executable, str(script)], timeout=30)
    try:
        got = {}
        older = threading.Thread(target=lambda: got.update(old=client.preview({"n": 1, "sleep": 1.0})))
        older.start()
        time.sleep(0.3)  # the builder edits again before the first answer
        got["new"] = client.preview({"n": 2})
        older.join()
        assert got["old"] is None and got["new"] == PlanPreview(2)
        first = client._proc
        assert client.preview({"die": True}).error.startswith("the preview helper stopped")
        assert client.preview({"n": 4}) == PlanPreview(4) and client._proc is not first
    finally:
        client.close()


HIDDEN_GROWN = [f.name for f in FAMILIES if f.kind == "causal_lm" and not f.stacks and f.refusal("widen_hidden") is None]


@pytest.mark.parametrize("name", HIDDEN_GROWN)
def test_widen_hidden_previews_what_the_build_adds(name, tmp_path, widen_home):
    """d_model growth on meta (both exact routes, then the zero route): the preview's `added` and
    totals are build_from_plan's; trainable follows name globs."""
    ops = [{"op": "widen_hidden", "size": 16, "init": "duplicate"}, {"op": "widen_hidden", "size": 32, "init": "zero"}]
    raw = _plan(str(_model_dir(name, tmp_path)), [(["*embed*", "*wte*"], ops)],
                [_for_family(family_named(name), op) for op in GROWTH])
    preview = preview_plan(copy.deepcopy(raw))
    assert preview.error == "", preview.error
    reports, _ = _measured(raw, tmp_path)
    previewed = [op for op in preview.stages[0].ops if ".grow." not in op.path]
    assert [(r["op"], r["params_added"]) for r in reports] == [(op.op, op.added) for op in previewed]
    assert (preview.stages[0].total_after, preview.stages[0].trainable) == \
        (reports[-1]["params_after"], reports[-1]["trainable"])


def assert_preview_matches_the_run(raw: dict, tmp_path) -> None:
    """The meta preview of a one-stage plan with a growth counts what a real build measures: each
    operator's parameters, the stage's totals and the growth's added parameters."""
    from engine.grow.preview import preview_plan

    preview = preview_plan(json.loads(json.dumps(raw)))
    assert preview.error == "", preview.error
    reports, grown = _measured(raw, tmp_path)
    ops = [op for op in preview.stages[0].ops if ".grow." not in op.path]
    assert [(r["op"], r["params_added"]) for r in reports] == [(op.op, op.added) for op in ops]
    assert (preview.stages[0].total_after, preview.stages[0].trainable) == \
        (reports[-1]["params_after"], reports[-1]["trainable"])
    assert [op.added for op in preview.stages[0].ops if ".grow." in op.path] == [grown] and grown > 0
