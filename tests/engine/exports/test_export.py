"""`widen export` and `widen plan show`: grown models become plain Hugging Face directories that
reload without widen and compute the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.exports.hf_directory import (
    ExportError,
    build_from_plan,
    export_model,
    load_run_model,
    reference_logits,
    stage_probe,
)
from engine.model.families import family_named
from engine.model.view import ArchView
from engine.plan import load_plan
from engine.train.loop import Trainer
from tests.conftest import widen
from tests.tiny_models import families_for, tiny_config
from widen_tui.launcher import create_run

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
    size = 4
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
# the decoder families every operator of GROWTH applies to
GROWTH_FAMILIES = sorted(set.intersection(*(set(families_for(op)) for op in
                                            ("widen_ffn", "insert_identity", "map_layers", "lora", "ia3"))))


def growth_for(family: str, growth: str = None) -> str:
    """GROWTH for `family`: on MoE families the adapters go on attention roles (their experts are
    fused 3-D tensors, no Linear modules PEFT wraps)."""
    growth = GROWTH if growth is None else growth
    if family_named(family).moe is None:
        return growth
    return growth.replace('["q", "v", "down"]', '["q", "v", "o"]').replace('["k", "up"]', '["k", "o"]') \
        .replace('feedforward = ["up"]', 'feedforward = ["o"]')

# A process that knows only transformers and torch: it loads each exported directory it is sent
# (one JSON line: directory, inputs file) and answers its logits, as a user without widen would.
RELOADER = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    for line in sys.stdin:
        directory, inputs_file = json.loads(line)
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.load(inputs_file)).logits.tolist()
        widen_loaded = any(name == "engine" or name.startswith("engine.") for name in sys.modules)
        print(json.dumps({"logits": logits, "widen_loaded": widen_loaded}), flush=True)
""")


class PlainReloader:
    """One long-lived plain process for the whole module: torch starts once, not per test."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", RELOADER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")

    def logits(self, directory, inputs_file) -> torch.Tensor:
        self.proc.stdin.write(json.dumps([str(directory), str(inputs_file)]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the reloading process died: {self.proc.stderr.read()[-2000:]}"
        answer = json.loads(line)
        assert not answer["widen_loaded"], "the export needed widen code to load"
        return torch.tensor(answer["logits"])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def plain():
    reloader = PlainReloader()
    yield reloader
    reloader.close()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`widen ARGS` in this process, through the same main() as the console script (no torch
    start-up per call): (exit code, stdout, stderr)."""
    from widen_tui import cli as widen_cli

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["widen", *args])
        try:
            widen_cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def grow_and_export(tmp_path, family, expand, keep_adapters=False, name="export", train_adapters=False):
    """Build the plan's model from a tiny saved `family` model, apply `expand`, export it.
    Returns (export dir, the grown model's logits, the probe inputs' file, manifest, reports)."""
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
    inputs_file = tmp_path / f"{family}-{name}.inputs.pt"
    torch.save(batch[0], inputs_file)
    return out, reference, inputs_file, manifest, reports


@pytest.mark.parametrize("family", GROWTH_FAMILIES)
def test_grown_models_reload_with_plain_transformers(tmp_path, widen_home, plain, family):
    out, reference, inputs_file, manifest, reports = grow_and_export(tmp_path, family, growth_for(family))
    assert [r["op"] for r in reports] == ["widen_ffn", "widen_ffn", "insert_identity", "map_layers", "lora", "ia3"]
    delta = float((plain.logits(out, inputs_file) - reference).abs().max())
    assert delta <= 1e-4, delta
    assert manifest["num_layers"] == 5 and manifest["ffn_size"] == 12 + 4 + 4
    assert manifest["adapters"] == "merged"
    config = json.loads((out / "config.json").read_text())
    entry = family_named(family)
    assert config[entry.num_layers_field] == 5
    # every FFN width describing blocks grew: the dense FFN's, a MoE model's experts'
    reloaded = ArchView(AutoConfig.from_pretrained(out))
    widths = [entry.moe.expert_size_field] if reloaded.sparse_layers() else []
    widths += [entry.ffn_size_field] if len(reloaded.sparse_layers()) < reloaded.num_layers else []
    assert widths and all(config[f] == 20 for f in widths), {f: config[f] for f in widths}
    if family == "gpt_neo":
        # tiny_config alternates global/local: after insert_identity([0]) and the mapping [0, 1, 2, 2, 1]
        assert config["attention_layers"] == ["global", "global", "local", "local", "global"]


@pytest.mark.parametrize("family", sorted(set(families_for("concat_linear")) & set(families_for("parallel_linear"))))
def test_linear_operators_export(tmp_path, widen_home, plain, family):
    linear_ops = """
        [[stages.expand]]
        op = "concat_linear"
        size = 2
        [[stages.expand]]
        op = "parallel_linear"
        modules = ["o", "q"]
        init = "random"
    """
    out, reference, inputs_file, manifest, _ = grow_and_export(tmp_path, family, linear_ops, name="linear")
    assert manifest["ffn_size"] == 14
    assert float((plain.logits(out, inputs_file) - reference).abs().max()) <= 1e-4


def test_exact_plans_export_the_original_function(tmp_path, widen_home, plain):
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
    with torch.no_grad():
        expected = original(input_ids=inputs).logits
    assert float((plain.logits(out, tmp_path / "inputs.pt") - expected).abs().max()) <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 4)
    assert config["num_hidden_layers"] == 4 and config["intermediate_size"] == 17


@pytest.mark.parametrize("family", families_for("lora"))
def test_keep_adapters_writes_peft_directories(tmp_path, widen_home, family):
    from peft import PeftModel

    from engine.model.forward import forward_logits

    expand = growth_for(family).split("[[stages.expand]]\n    op = \"lora\"")[0].replace('mode = "parallel"',
                                                                                   'mode = "inplace"')
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
    out, reference, inputs_file, manifest, _ = grow_and_export(tmp_path, family, expand, keep_adapters=True,
                                                               train_adapters=True)
    assert manifest["adapters"] == "kept"
    names = [a["name"] for a in manifest["kept_adapters"]]
    assert sorted(names) == ["lora_stage0", "second"]  # in the order the modules hold them
    assert (out / "adapter" / "second" / "adapter_config.json").exists()
    # the recipe a user without widen follows
    base = AutoModelForCausalLM.from_pretrained(out)
    peft_model = PeftModel.from_pretrained(base, out / "adapter" / "lora_stage0", adapter_name="lora_stage0")
    peft_model.load_adapter(out / "adapter" / "second", adapter_name="second")
    peft_model.base_model.set_adapter(names)
    with torch.no_grad():
        logits = forward_logits(peft_model.eval(), torch.load(inputs_file))
    assert float((logits - reference).abs().max()) <= 1e-4
    with torch.no_grad(), peft_model.disable_adapter():  # the adapters matter: the base alone differs
        assert float((forward_logits(peft_model, torch.load(inputs_file)) - reference).abs().max()) > 1e-3


@pytest.mark.parametrize("family", [f for f in families_for("lora") if family_named(f).moe is not None])
def test_kept_lora_on_expert_tensors_loads_into_peft(tmp_path, widen_home, family):
    """LoRA on the fused expert tensors is kept as PEFT describes it (target_parameters, not
    target_modules): PEFT's own loader puts it back onto the plain exported model."""
    from peft import PeftModel

    from engine.model.forward import forward_logits

    expand = """
    [[stages.expand]]
    op = "lora"
    modules = ["q", "down"]
    r = 2
    """
    out, reference, inputs_file, manifest, _ = grow_and_export(tmp_path, family, expand, keep_adapters=True,
                                                               train_adapters=True)
    config = json.loads((out / "adapter" / "lora_stage0" / "adapter_config.json").read_text())
    assert config["target_parameters"] and all(p.endswith("down_proj") for p in config["target_parameters"])
    base = AutoModelForCausalLM.from_pretrained(out)
    peft_model = PeftModel.from_pretrained(base, out / "adapter" / "lora_stage0")
    with torch.no_grad():
        logits = forward_logits(peft_model.eval(), torch.load(inputs_file))
    assert float((logits - reference).abs().max()) <= 1e-4


def test_keep_adapters_through_the_cli(tmp_path, widen_home, capsys):
    expand = """
        [[stages.expand]]
        op = "map_layers"
        mapping = [0, 1, 1, 0]
        [[stages.expand]]
        op = "ia3"
        modules = ["k", "down"]
        feedforward = ["down"]
    """
    plan = write_plan(tmp_path, save_tiny("gpt_neox", tmp_path / "src"), expand)
    out = tmp_path / "kept"
    code, stdout, err = cli(capsys, "export", str(plan), str(out), "--keep-adapters")
    assert code == 0, err
    assert "+ PeftModel" in stdout
    manifest = json.loads((out / "widen_export.json").read_text())
    assert manifest["kept_adapters"] == [{"name": "ia3_stage0", "kind": "ia3", "active": True,
                                          "path": "adapter/ia3_stage0"}]
    assert manifest["parity"]["max_abs_logit_delta"] <= 1e-4
    saved = json.loads((out / "adapter" / "ia3_stage0" / "adapter_config.json").read_text())
    # the virtual copies are real blocks in the export, each with its own adapter entry
    assert sorted(saved["target_modules"]) == sorted(
        f"gpt_neox.layers.{i}.{leaf}" for i in range(4) for leaf in ("attention.query_key_value", "mlp.dense_4h_to_h"))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_plan_show_json_and_table(tmp_path, widen_home, capsys):
    plan = write_plan(tmp_path, save_tiny("gpt2", tmp_path / "src"), GROWTH)
    code, out, _ = cli(capsys, "plan", "show", str(plan), "--json")
    assert code == 0
    reports = json.loads(out)
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
    code, table, _ = cli(capsys, "plan", "show", str(plan))
    assert code == 0 and "insert_identity" in table and "map_layers" in table


def test_export_cli_for_a_run_and_bad_input(tmp_path, widen_home, tiny_plan, capsys, plain):
    out = tmp_path / "exported"
    # a real process: the user sees one line, never a traceback
    bad = widen("export", str(tmp_path / "nope.toml"), str(out), env_home=widen_home)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"error: {tmp_path / 'nope.toml'}: no such plan file"
    code, _, err = cli(capsys, "export", "last", str(out))
    assert code == 1 and err.startswith("error: no run 'last'")

    # the tiny plan, shortened: a finished run with a checkpoint after its widening stage
    run = create_run(load_plan(tiny_plan, ["stages.0.steps=2", "stages.1.steps=2"]), tiny_plan, widen_home)
    code, _, err = cli(capsys, "export", run.id, str(out))
    assert code == 1 and "has no checkpoint yet" in err and len(err.strip().splitlines()) == 1
    Trainer(run.path).run_plan()  # in this process: the worker's code path, without its start-up

    code, stdout, err = cli(capsys, "export", "last", str(out))
    assert code == 0, err
    assert "parity: max |Δlogits|" in stdout and "AutoModelForCausalLM" in stdout
    manifest = json.loads((out / "widen_export.json").read_text())
    assert manifest["parity"]["max_abs_logit_delta"] <= 1e-4 and manifest["source"]["trained"]
    assert manifest["source"]["run"] == run.id
    assert [r["op"] for r in manifest["operators"]] == ["widen_ffn"]
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 512 + 16  # tiny-neo widened by the plan's second stage
    trained, _, tokenizer, plan = load_run_model(run.path)
    batch = stage_probe(plan, 1, tokenizer)
    torch.save(batch[0], tmp_path / "inputs.pt")
    assert float((plain.logits(out, tmp_path / "inputs.pt") - reference_logits(trained, batch)).abs().max()) <= 1e-4


# families whose head width follows d_model: a config cannot say "more heads of the same width"
FIXED_HEAD_WIDTH = [f for f in families_for("add_heads") if family_named(f).attention.width_follows_hidden]


@pytest.mark.parametrize("family", FIXED_HEAD_WIDTH)
def test_added_heads_that_the_config_cannot_describe_are_refused(tmp_path, widen_home, family):
    heads = """
        [[stages.expand]]
        op = "add_heads"
        size = 1
    """
    with pytest.raises(ExportError, match="cannot describe heads added"):
        grow_and_export(tmp_path, family, heads, name="heads")


def test_uneven_widths_and_mixed_kept_adapters_get_one_clear_error(tmp_path, widen_home, capsys):
    uneven = """
        [[stages.expand]]
        op = "widen_ffn"
        layers = [0]
        size = 4
    """
    with pytest.raises(ExportError, match="FFN widths"):
        grow_and_export(tmp_path, "gpt2", uneven, name="uneven")
    plan = write_plan(tmp_path, save_tiny("gpt2", tmp_path / "src2"), uneven, name="cli")
    code, _, err = cli(capsys, "export", str(plan), str(tmp_path / "cli-out"))
    assert code == 1 and "FFN widths" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

    mixed = """
        [[stages.expand]]
        op = "lora"
        modules = ["q"]
        [[stages.expand]]
        op = "ia3"
        modules = ["k"]
    """
    plan = write_plan(tmp_path, save_tiny("llama", tmp_path / "src3"), mixed, name="mixed")
    code, _, err = cli(capsys, "export", str(plan), str(tmp_path / "mixed-out"), "--keep-adapters")
    assert code == 1 and "adapters of different kinds" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = cli(capsys, "export", str(plan), str(tmp_path / "mixed-out"))  # merged: fine
    assert code == 0, err
    assert json.loads((tmp_path / "mixed-out" / "widen_export.json").read_text())["adapters"] == "merged"


def test_a_tokenizer_larger_than_the_vocabulary_is_one_clear_error(tmp_path, widen_home):
    from engine.model.sources import ModelLoadError

    config = tiny_config("gpt2", 1, 2, 4, 8)  # 61 ids: the byte tokenizer's 259 do not fit
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "small-vocab")
    plan = load_plan(write_plan(tmp_path, tmp_path / "small-vocab", ""))
    with pytest.raises(ModelLoadError, match="tokenizer has 259 ids but the model's vocabulary has 61"):
        build_from_plan(plan)
