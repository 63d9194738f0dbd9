"""The Python API (engine.api, re-exported by engine): docs/python.md runs as written; typo'd
parameters are one clear error; reports measure; export reloads; `import engine` stays cheap."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
from engine.errors import WidenError
from engine.model.view import count_params
from engine.runs.records import ExpandEvent, build_event

ROOT = Path(__file__).resolve().parents[2]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python.md").read_text(), re.S)


def test_docs_python_md_runs(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_python_md"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/python.md block {i + 1}", "exec"), namespace)
    assert namespace["delta"] <= 1e-4 and namespace["grown"]["max_abs_logit_delta"] <= 1e-4


def test_import_engine_imports_no_torch():
    code = ("import sys, engine\nassert 'expand' in engine.__all__ and 'GrowthCallback' in engine.__all__\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_a_typo_is_one_clear_error():
    model, view = engine.load("builtin:tiny-neo")
    before = count_params(model)
    with pytest.raises(engine.OperatorParamsError) as caught:
        engine.expand(model, "widen_ffn", view=view, size=8, inti="zeros")
    assert isinstance(caught.value, WidenError)
    assert str(caught.value) == "widen_ffn.inti: unknown key — did you mean 'init'?"
    with pytest.raises(engine.OperatorParamsError, match=r"^widen_ffn\.size: must be greater than 0, got -3"):
        engine.expand(model, "widen_ffn", size=-3)
    with pytest.raises(engine.OperatorParamsError, match=r"^op: unknown operator 'widen_fnn' — did you mean 'widen_ffn'"):
        engine.expand(model, "widen_fnn", size=8)
    assert count_params(model) == before  # nothing was applied


def test_exact_report_is_an_expand_event():
    model, view = engine.load("builtin:tiny-neo")
    before = count_params(model)
    report = engine.expand(model, "widen_ffn", view=view, size=16, init="zero_out")
    assert isinstance(report, engine.ExpandReport)
    assert report.exact and report.max_abs_logit_delta <= 1e-4
    assert report.params_before == before and report.params_added == report.params_after - before > 0
    event = report.as_event()
    assert "growth" not in event and isinstance(build_event("expand", {"type": "expand", "t": 0.0, **event}),
                                                  ExpandEvent)
    assert report.new_grad_norm > 0  # zero-init units still receive gradient
    # a random init changes the function, and the report says so
    noisy = engine.expand(model, "widen_ffn", view=view, size=16, init="random", mode="parallel", seed=3)
    assert not noisy.exact and noisy.max_abs_logit_delta > 1e-3


def test_freeze_base_trains_only_the_new_entries():
    model, view = engine.load("builtin:tiny-neo")
    report = engine.expand(model, "widen_ffn", view=view, size=16, init="net2net")  # in place: masked rows
    frozen = engine.freeze(model, "base", report)
    assert frozen.masked and frozen.trainable == report.params_added
    groups = engine.param_groups(model, weight_decay=0.1)
    masked = {name for name in frozen.masked}
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    assert not decayed & masked
    with pytest.raises(WidenError, match="pass its report"):
        engine.freeze(model, "base")
    assert engine.freeze(model, "none").trainable == count_params(model)


def test_export_reloads_and_matches(tmp_path):
    from transformers import AutoModelForCausalLM

    model, view = engine.load("builtin:tiny-neo")
    report = engine.expand(model, "widen_ffn", view=view, size=16, init="random", mode="parallel")
    optimizer = torch.optim.AdamW(engine.param_groups(model), lr=1e-2)
    inputs, targets = engine.probe_batch(model, seed=5)
    model(input_ids=inputs, labels=inputs).loss.backward()
    optimizer.step()
    probe = engine.probe_batch(model, seed=9)
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=probe[0]).logits
    manifest = engine.export(model, tmp_path / "out", probe=probe)
    assert manifest["parity"]["max_abs_logit_delta"] <= 1e-4
    assert manifest["ffn_size"] == 512 + 16 and report.params_added > 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (reloaded(input_ids=probe[0]).logits - reference).abs().max().item() <= 1e-4
    # the model passed in keeps its parallel paths (a copy was materialized)
    assert type(model.transformer.h[0].mlp).__name__ != type(reloaded.transformer.h[0].mlp).__name__


def test_api_functions_are_functions_and_the_machinery_keeps_its_modules():
    from engine.exports import hf_directory as export_module
    from engine.grow.apply import apply_stage  # the machinery keeps its module

    assert callable(apply_stage) and hasattr(export_module, "export_model")
    assert callable(engine.expand) and callable(engine.export)  # the API functions, not modules
