"""`widen export` and `widen plan show`: grown models become plain Hugging Face directories that
reload without widen and compute the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.export import ExportError, build_from_plan, export_model, reference_logits, stage_probe
from engine.plan import load_plan
from tests.conftest import widen
from tests.tiny_models import tiny_config

EXPORT_VOCAB = 260  # the byte tokenizer's ids fit


def save_tiny(family: str, path, layers=2, heads=2, head_dim=4, ffn=12, seed=0):
    """A tiny random model saved like a downloaded one: the plan loads it by directory."""
    torch.manual_seed(seed)
    config = tiny_config(family, layers, heads, head_dim, ffn)
    config.vocab_size = EXPORT_VOCAB
    model = AutoModelForCausalLM.from_config(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(path)
    return path


def write_plan(tmp_path, model_dir, expand: str, name="export") -> object:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)))
    plan = tmp_path / f"{name}.toml"
    plan.write_text(textwrap.dedent(f"""
        name = "{name}"
        seed = 1
        [model]
        source = "{model_dir}"
        [tasks.code]
        source = "{corpus}"
        [train]
        batch_size = 2
        seq_len = 16
        eval_batches = 1
        device = "cpu"
        [[stages]]
        task = "code"
        steps = 0
    """) + textwrap.dedent(expand))
    return plan


GROWTH = """
    [[stages.expand]]
    op = "widen_ffn"
    size = 4
    mode = "parallel"
    [[stages.expand]]
    op = "widen_ffn"
    size = 3
    mode = "inplace"
    init = "net2net"
    [[stages.expand]]
    op = "insert_identity"
    layers = [0]
    [[stages.expand]]
    op = "map_layers"
    mapping = [0, 1, 2, 2, 1]
    [[stages.expand]]
    op = "lora"
    modules = ["q", "v", "down"]
    r = 2
    [[stages.expand]]
    op = "ia3"
    modules = ["k", "up"]
    feedforward = ["up"]
"""

RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    out = {}
    for directory, inputs_file in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            out[directory] = model(input_ids=torch.load(inputs_file)).logits.tolist()
    assert not any(name == "engine" or name.startswith("engine.") for name in sys.modules)
    print(json.dumps(out))
""")


def reload_without_widen(cases: list[tuple[str, str]]) -> dict:
    """Logits of each exported directory, loaded in a fresh process that never imports widen."""
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {k: torch.tensor(v) for k, v in json.loads(proc.stdout).items()}


def grow_and_export(tmp_path, family, expand, keep_adapters=False, name="export", train_adapters=False):
    plan = load_plan(write_plan(tmp_path, save_tiny(family, tmp_path / f"{family}-src"), expand, name))
    model, view, tokenizer, reports = build_from_plan(plan)
    if train_adapters:  # stand-in for training: adapters that change the function
        torch.manual_seed(0)
        for name_, p in model.named_parameters():
            if "lora_B" in name_:
                torch.nn.init.normal_(p, std=0.3)
    batch = stage_probe(plan, 0, tokenizer)
    reference = reference_logits(model, batch)
    out = tmp_path / f"{family}-{name}"
    manifest = export_model(model, tokenizer, out, keep_adapters=keep_adapters, reports=reports)
    torch.save(batch[0], tmp_path / f"{family}-{name}.inputs.pt")
    return out, reference, manifest, reports


def test_grown_models_of_every_family_reload_with_plain_transformers(tmp_path, widen_home):
    cases, references, manifests = [], {}, {}
    for family in ("gpt_neo", "gpt2", "gpt_neox", "llama"):
        out, reference, manifest, reports = grow_and_export(tmp_path, family, GROWTH)
        assert [r["op"] for r in reports] == ["widen_ffn", "widen_ffn", "insert_identity", "map_layers", "lora", "ia3"]
        cases.append((str(out), str(tmp_path / f"{family}-export.inputs.pt")))
        references[str(out)], manifests[str(out)] = reference, manifest
    linear_ops = """
        [[stages.expand]]
        op = "concat_linear"
        size = 2
        [[stages.expand]]
        op = "parallel_linear"
        modules = ["o", "q"]
        init = "random"
    """
    linear_cases = {}
    for family in ("gpt2", "llama"):
        out, reference, manifest, _ = grow_and_export(tmp_path, family, linear_ops, name="linear")
        cases.append((str(out), str(tmp_path / f"{family}-linear.inputs.pt")))
        linear_cases[str(out)] = reference
        assert manifest["ffn_size"] == 14
    logits = reload_without_widen(cases)
    for out, reference in linear_cases.items():
        assert float((logits.pop(out) - reference).abs().max()) <= 1e-4
    for out, reference in references.items():
        delta = float((logits[out] - reference).abs().max())
        assert delta <= 1e-4, (out, delta)
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert manifests[out]["num_layers"] == 5 and manifests[out]["ffn_size"] == 12 + 4 + 3
        assert manifests[out]["adapters"] == "merged"
        depth_key = {"gpt2": "n_layer", "gpt_neo": "num_layers"}.get(config["model_type"], "num_hidden_layers")
        ffn_key = "n_inner" if config["model_type"] == "gpt2" else "intermediate_size"
        assert config[depth_key] == 5 and config[ffn_key] == 19
    neo = json.loads((tmp_path / "gpt_neo-export" / "config.json").read_text())
    # tiny_config alternates global/local: after insert_identity([0]) and the mapping [0, 1, 2, 2, 1]
    assert neo["attention_layers"] == ["global", "global", "local", "local", "global"]


def test_exact_plans_export_the_original_function(tmp_path, widen_home):
    expand = """
        [[stages.expand]]
        op = "add_heads"
        size = 2
        [[stages.expand]]
        op = "widen_ffn"
        size = 5
        mode = "parallel"
        [[stages.expand]]
        op = "insert_identity"
        layers = "all"
    """
    src = save_tiny("llama", tmp_path / "llama-src")
    plan = load_plan(write_plan(tmp_path, src, expand))
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    model, _, tokenizer, reports = build_from_plan(plan)
    assert all(r["exact"] and r["max_abs_logit_delta"] <= 1e-4 for r in reports)
    inputs = stage_probe(plan, 0, tokenizer)[0]
    out = tmp_path / "exported"
    export_model(model, tokenizer, out)
    torch.save(inputs, tmp_path / "inputs.pt")
    exported = reload_without_widen([(str(out), str(tmp_path / "inputs.pt"))])[str(out)]
    with torch.no_grad():
        expected = original(input_ids=inputs).logits
    assert float((exported - expected).abs().max()) <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 4)
    assert config["num_hidden_layers"] == 4 and config["intermediate_size"] == 17


def test_keep_adapters_writes_peft_directories(tmp_path, widen_home):
    from peft import PeftModel

    from engine.arch.forward import forward_logits

    expand = GROWTH.split("[[stages.expand]]\n    op = \"lora\"")[0].replace('mode = "parallel"', 'mode = "inplace"')
    expand += """
    [[stages.expand]]
    op = "lora"
    modules = ["q", "v"]
    r = 2
    [[stages.expand]]
    op = "lora"
    name = "second"
    modules = ["o"]
    r = 2
    """
    out, reference, manifest, _ = grow_and_export(tmp_path, "llama", expand, keep_adapters=True, train_adapters=True)
    assert manifest["adapters"] == "kept"
    names = [a["name"] for a in manifest["kept_adapters"]]
    assert names == ["lora_stage0", "second"]
    assert (out / "adapter" / "second" / "adapter_config.json").exists()
    # the recipe a user without widen follows
    base = AutoModelForCausalLM.from_pretrained(out)
    peft_model = PeftModel.from_pretrained(base, out / "adapter" / "lora_stage0", adapter_name="lora_stage0")
    peft_model.load_adapter(out / "adapter" / "second", adapter_name="second")
    peft_model.base_model.set_adapter(names)
    with torch.no_grad():
        logits = forward_logits(peft_model.eval(), torch.load(tmp_path / "llama-export.inputs.pt"))
    assert float((logits - reference).abs().max()) <= 1e-4
    with torch.no_grad(), peft_model.disable_adapter():  # the adapters matter: the base alone differs
        assert float((forward_logits(peft_model, torch.load(tmp_path / "llama-export.inputs.pt")) - reference).abs().max()) > 1e-3


def test_plan_show_json_and_table(tmp_path, widen_home):
    plan = write_plan(tmp_path, save_tiny("gpt2", tmp_path / "src"), GROWTH)
    out = widen("plan", "show", str(plan), "--json", env_home=widen_home, check=True)
    reports = json.loads(out.stdout)
    assert [r["op"] for r in reports] == ["widen_ffn", "widen_ffn", "insert_identity", "map_layers", "lora", "ia3"]
    for r in reports:
        for key in ("stage", "op", "params_added", "trainable", "exact", "max_abs_logit_delta",
                    "loss_before", "loss_after"):
            assert key in r, key
        if r["op"] == "map_layers":  # repeats a real block: a different function, measured
            assert not r["exact"] and 0 < r["max_abs_logit_delta"] < float("inf")
        else:
            assert r["exact"] and r["max_abs_logit_delta"] <= 1e-4, r
    assert reports[2]["params_added"] > 0 and reports[3]["params_added"] == 0  # a virtual repeat adds none
    table = widen("plan", "show", str(plan), env_home=widen_home, check=True)
    assert "insert_identity" in table.stdout and "map_layers" in table.stdout


def test_export_cli_for_a_run_and_bad_input(tmp_path, widen_home, tiny_plan):
    out = tmp_path / "exported"
    bad = widen("export", str(tmp_path / "nope.toml"), str(out), env_home=widen_home)
    assert bad.returncode == 1 and "no such plan file" in bad.stderr and "Traceback" not in bad.stderr
    missing = widen("export", "last", str(out), env_home=widen_home)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    widen("run", str(tiny_plan), env_home=widen_home, check=True, timeout=300)
    done = widen("export", "last", str(out), env_home=widen_home, check=True, timeout=300)
    assert "parity: max |Δlogits|" in done.stdout
    manifest = json.loads((out / "widen_export.json").read_text())
    assert manifest["parity"]["max_abs_logit_delta"] <= 1e-4 and manifest["source"]["trained"]
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 512 + 16  # tiny-neo widened by the plan's second stage


def test_configs_that_cannot_describe_the_model_get_one_clear_error(tmp_path, widen_home):
    uneven = """
        [[stages.expand]]
        op = "widen_ffn"
        layers = [0]
        size = 4
    """
    with pytest.raises(ExportError, match="FFN widths"):
        grow_and_export(tmp_path, "gpt2", uneven, name="uneven")
    heads = """
        [[stages.expand]]
        op = "add_heads"
        size = 1
    """
    with pytest.raises(ExportError, match="cannot describe heads"):
        grow_and_export(tmp_path, "gpt2", heads, name="heads")
    plan = write_plan(tmp_path, save_tiny("gpt2", tmp_path / "src2"), uneven, name="cli")
    proc = widen("export", str(plan), str(tmp_path / "cli-out"), env_home=widen_home)
    assert proc.returncode == 1 and "FFN widths" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
