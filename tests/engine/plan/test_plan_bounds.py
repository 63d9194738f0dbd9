"""`plan check` catches what the engine would trip on, one line per problem (`field: message — fix`):
names that become file names, bounded numbers (no bools as numbers, no inf/nan), sources,
tokenizers and devices checked cheaply, sweep mappings, and messages that survive rich markup."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.grow.operator_fit import validate_plan_file as validate_file
from engine.plan import checks as plan_checks
from engine.plan import plan_from_dict, read_toml
from tests.conftest import ROOT

EXPERIMENTS = ROOT / "experiments"
QUICKSTART = EXPERIMENTS / "quickstart.toml"
SWEEP = EXPERIMENTS / "mapping_sweep.toml"
WIDEN = ROOT / ".venv" / "bin" / "widen"


def problems_of(path, *overrides) -> list[str]:
    _, problems = validate_file(path, list(overrides))
    return [str(p) for p in problems]


def widen_check(path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(WIDEN)] if WIDEN.exists() else [sys.executable, "-m", "widen_tui.cli"]
    return subprocess.run([*command, "plan", "check", str(path), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def assert_one_problem(problems: list[str], field: str, *fragments: str) -> None:
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.startswith(f"{field}: "), problem
    assert " — " in problem, f"no fix in: {problem}"
    assert "\n" not in problem and "Traceback" not in problem
    for fragment in fragments:
        assert fragment in problem, problem


# (plan, overrides, the field, fragments of the message and its fix)
NUMBER_CASES = {
    "seed -1": (QUICKSTART, ["seed=-1"], "seed", ["got -1", "0..4294967295"]),
    "seed 2**63": (QUICKSTART, [f"seed={2**63}"], "seed", [f"got {2**63}", "0..4294967295"]),
    "lr 1e300": (QUICKSTART, ["train.lr=1e300"], "train.lr", ["got 1e+300", "(0, 10000]"]),
    "lr inf": (QUICKSTART, ["train.lr=inf"], "train.lr", ["finite", "got inf"]),
    "lr nan": (QUICKSTART, ["train.lr=nan"], "train.lr", ["finite", "got nan"]),
    "stage lr inf": (QUICKSTART, ["stages.0.lr=inf"], "stages.0.lr", ["finite"]),
    "weight_decay inf": (QUICKSTART, ["train.weight_decay=inf"], "train.weight_decay", ["finite"]),
    "grad_clip nan": (QUICKSTART, ["train.grad_clip=nan"], "train.grad_clip", ["finite"]),
    "eval_batches 10**18": (QUICKSTART, [f"train.eval_batches={10**18}"], "train.eval_batches", ["1..10000"]),
    "size 10**18": (QUICKSTART, [f"stages.1.expand.0.size={10**18}"], "stages.1.expand.0.size", ["1..65536"]),
    "steps 2**80": (QUICKSTART, [f"stages.0.steps={2**80}"], "stages.0.steps", ["0..1000000000"]),
    "seq_len above the schema": (QUICKSTART, [f"train.seq_len={2**21}"], "train.seq_len", ["1048576"]),
    "seq_len 100000 (model positions)": (QUICKSTART, ["train.seq_len=100000"], "train.seq_len",
                                         ["512 positions", "max_position_embeddings", "seq_len <= 512"]),
    "batch_size = true": (QUICKSTART, ["train.batch_size=true"], "train.batch_size", ["got true", "not true/false"]),
    "lr = true": (QUICKSTART, ["train.lr=true"], "train.lr", ["got true"]),
    "max_docs 10**18": (QUICKSTART, [f"tasks.python.max_docs={10**18}"], "tasks.python.max_docs", ["1..1000000000"]),
    "max_new_tokens true": (QUICKSTART, ["tasks.python.max_new_tokens=true"], "tasks.python.max_new_tokens",
                            ["got true"]),
    "layers [true]": (QUICKSTART, ["stages.1.expand.0.layers=[true]"], "stages.1.expand.0.layers.0", ["got true"]),
    "layers 3 (a union: one line)": (QUICKSTART, ["stages.1.expand.0.layers=3"], "stages.1.expand.0.layers",
                                     ["must be 'all' or a list, got 3"]),
    "freeze 3 (a union: one line)": (QUICKSTART, ["stages.1.freeze=3"], "stages.1.freeze", ["'none' or 'base'"]),
}


@pytest.mark.parametrize("case", list(NUMBER_CASES))
def test_numbers_are_bounded(case):
    plan, overrides, field, fragments = NUMBER_CASES[case]
    assert_one_problem(problems_of(plan, *overrides), field, *fragments)


def test_whole_numbers_still_read_as_floats():
    assert problems_of(QUICKSTART, "train.lr=1", "stages.0.lr=2", "train.grad_clip=0") == []
    assert problems_of(QUICKSTART, "train.lr=1e4") == []


@pytest.mark.parametrize("key", ["r", "alpha"])
def test_op_fields_are_bounded(tmp_path, key):
    plan = tmp_path / "p.toml"
    plan.write_text(QUICKSTART.read_text().replace('op = "widen_ffn"', 'op = "lora"\nname = "ok-name"')
                    .replace("size = 128", f"{key} = 1e300" if key == "alpha" else f"{key} = {10**9}")
                    .replace('init = "zero_out"', "").replace('mode = "parallel"', ""))
    problems = problems_of(plan)
    assert_one_problem(problems, f"stages.1.expand.0.{key}", "use a value in")


TRAVERSAL = "../../../../../../x"


@pytest.mark.parametrize("where, field", [
    ("task", f"tasks.{TRAVERSAL}"),
    ("variant", "variants.0.name"),
    ("stage", "stages.0.name"),
    ("adapter", "stages.1.expand.0.name"),
    ("plan", "name"),
])
def test_names_that_become_paths_are_refused(tmp_path, where, field):
    text = QUICKSTART.read_text()
    if where == "task":
        text = text.replace("[tasks.prose]", f'[tasks."{TRAVERSAL}"]').replace('task = "prose"', f'task = "{TRAVERSAL}"')
    elif where == "variant":
        text += f'\n[[variants]]\nname = "{TRAVERSAL}"\n'
    elif where == "stage":
        text = text.replace('name = "prose"', f'name = "{TRAVERSAL}"', 1)
    elif where == "adapter":
        text = (text.replace('op = "widen_ffn"', f'op = "lora"\nname = "{TRAVERSAL}"').replace("size = 128", "")
                .replace('init = "zero_out"', "").replace('mode = "parallel"', ""))
    else:
        text = text.replace('name = "quickstart"', f'name = "{TRAVERSAL}"')
    plan = tmp_path / "p.toml"
    plan.write_text(text)
    assert_one_problem(problems_of(plan), field, "cannot", "use 1 to 64")


def test_traversal_task_name_fails_plan_check(tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text(QUICKSTART.read_text().replace("[tasks.prose]", f'[tasks."{TRAVERSAL}"]')
                    .replace('task = "prose"', f'task = "{TRAVERSAL}"'))
    proc = widen_check(plan)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"tasks.{TRAVERSAL}: " in lines[0] and "it becomes a file name" in lines[0]


def test_existing_names_still_pass():
    """Every plan in experiments/ passes the schema and cross checks (the names among them);
    the model-dependent checks of the network ones are tests/test_experiments.py's."""
    for path in sorted(EXPERIMENTS.glob("*.toml")):
        plan_from_dict(read_toml(path))


def test_sources_are_checked_cheaply(tmp_path):
    missing = tmp_path / "missing.txt"
    assert_one_problem(problems_of(QUICKSTART, f'tasks.prose.source="{missing}"'), "tasks.prose.source",
                       "no such file or directory", "give an existing path")
    assert_one_problem(problems_of(QUICKSTART, 'tasks.prose.source="builtin:nope"'), "tasks.prose.source",
                       "unknown built-in corpus 'nope'", "builtin:pydoc", "builtin:docstring-code")
    text = tmp_path / "corpus.txt"
    text.write_text("some text\n")
    assert problems_of(QUICKSTART, f'tasks.prose.source="{text}"') == []
    assert problems_of(QUICKSTART, 'tasks.prose.source="someone/some-dataset"') == []  # a hub name: shape only


def test_bad_tokenizer_dir(tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "README.md").write_text("not a tokenizer")
    assert_one_problem(problems_of(QUICKSTART, f'model.tokenizer="{empty}"'), "model.tokenizer",
                       "no tokenizer files", "save one there")
    assert_one_problem(problems_of(QUICKSTART, f'model.tokenizer="{tmp_path / "nope"}"'), "model.tokenizer",
                       "no such directory")
    (empty / "tokenizer.json").write_text("{}")
    assert problems_of(QUICKSTART, f'model.tokenizer="{empty}"') == []
    assert problems_of(QUICKSTART, 'model.tokenizer="EleutherAI/pythia-70m"') == []  # hub name: shape only


def test_float16_on_cpu():
    assert_one_problem(problems_of(QUICKSTART, 'train.device="cpu"', 'train.dtype="float16"'), "train.dtype",
                       "needs a CUDA device", '"bfloat16"')


def test_cuda_without_gpu(monkeypatch):
    monkeypatch.setattr(plan_checks, "cuda_available", lambda: False)
    assert_one_problem(problems_of(QUICKSTART, 'train.device="cuda"'), "train.device",
                       "CUDA is not available", 'use "auto" or "cpu"')
    assert_one_problem(problems_of(QUICKSTART, 'train.dtype="float16"'), "train.dtype",
                       "this machine has none", '"bfloat16"')
    monkeypatch.setattr(plan_checks, "cuda_available", lambda: True)
    assert problems_of(QUICKSTART, 'train.device="cuda"', 'train.dtype="float16"') == []


def test_cuda_without_gpu_through_plan_check(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = widen_check(QUICKSTART, "--set", 'train.device="cuda"')
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.device: " in lines[0] and "CUDA is not available" in lines[0], proc.stderr


@pytest.mark.parametrize("overrides, field, fragments", [
    (["sweep.mappings=[[99, -5]]"], "sweep.mappings.0", ["has 2 entries", "needs 8"]),
    (["sweep.mappings=[[0, 1, 1, 2, 2, 3, 3, 99]]"], "sweep.mappings.0", ["uses layer 99", "0..3"]),
    (["sweep.limit=1", "sweep.depth=40"], None, []),
    (['model.source="builtin:mlp"'], "sweep", ["decoder-only", "remove [sweep]"]),
])
def test_sweep_mappings_are_checked_before_training(overrides, field, fragments):
    problems = problems_of(SWEEP, *overrides)
    if field is None:
        assert problems == []
        return
    if field == "sweep.mappings.0" and "99, -5" in overrides[0]:
        assert len(problems) == 2 and all(p.startswith("sweep.mappings.0: ") for p in problems), problems
        assert "uses layer -5, 99" in problems[1] and "0..3" in problems[1]
        return
    assert_one_problem(problems, field, *fragments)


def test_sweep_without_limit_draws_from_the_families_when_growing_or_needs_few_mappings(tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text(SWEEP.read_text().replace("limit = 24", ""))
    assert problems_of(plan, "sweep.depth=40") == []  # 4 -> 40 layers: ~10^9 mappings, the families stand in
    assert problems_of(plan, "sweep.depth=3", "train.seq_len=64") == []  # shrinking: every mapping, few
    assert_one_problem(problems_of(plan, 'model.source="builtin:tiny-neo"', "sweep.depth=2", "sweep.keep_ends=false",
                                   "sweep.families=[\"dus\"]"), "sweep.families.0", "dus gives no mapping of 2 "
                       "layers over 4", "fits d < D ≤ 2d")


@pytest.mark.parametrize("overrides, field, fragments", [
    (['sweep.families=["bandd"]'], "sweep.families.0", ["no mapping family 'bandd'", "did you mean 'band'"]),
    (['sweep.families=["dus", "band:width=2"]'], "sweep.families.1", ["band has no parameter 'width'"]),
    (['sweep.families=["band:times=4"]'], "sweep.families.0", ["band:times=4 gives no mapping of 8 layers over 4",
                                                                "fits D > d"]),
    (['sweep.families=["dus"]', "sweep.mappings=[[0, 1, 2, 3, 0, 1, 2, 3]]"], "sweep", ["mappings or families"]),
    (["sweep.per_family=0"], "sweep.per_family", ["greater than 0"]),
])
def test_sweep_families_are_checked_before_training(overrides, field, fragments):
    assert_one_problem(problems_of(SWEEP, *overrides), field, *fragments)


def test_sweep_families_in_a_plan():
    assert problems_of(SWEEP, 'sweep.families=["all", "band:times=3"]', "sweep.per_family=2") == []


def test_sweep_mappings_counted_after_depth_operators():
    # insert_identity on every layer: 4 -> 8 layers, so a mapping may use layer 7
    assert problems_of(SWEEP, "sweep.mappings=[[0, 1, 2, 3, 4, 5, 6, 7]]",
                       'stages.0.expand=[{op = "insert_identity"}]') == []


def test_markup_in_messages_shows_literally(tmp_path):
    proc = widen_check(QUICKSTART, "--set", "stages.0.task=nosuch")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "define [tasks.nosuch] or use one of: prose, python" in lines[0], lines[0]
    plan = tmp_path / "p.toml"
    plan.write_text('name = "p"\n[tasks.prose]\nsource = "builtin:pydoc"\n[train]\ndevice = "cpu"\n')
    proc = widen_check(plan)
    assert proc.returncode == 1
    assert "add at least one [[stages]] table" in proc.stderr, proc.stderr


def test_long_values_are_shortened(tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text(QUICKSTART.read_text().replace("steps = 200", f'steps = "{"x" * 100_000}"', 1))
    problems = problems_of(plan)
    assert len(problems) == 1 and problems[0].startswith("stages.0.steps: ")
    assert len(problems[0]) < 300 and "…" in problems[0], problems[0][:400]


def test_keys_with_newlines_stay_on_one_line(tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text(QUICKSTART.read_text().replace("[train]", '[train]\n"bad\\nkey" = 1'))
    problems = problems_of(plan)
    assert len(problems) == 1 and "\n" not in problems[0] and "train.bad\\nkey: unknown key" in problems[0]


def test_cpu_plan_check_does_not_import_torch():
    """Without operators to apply (engine.grow.operator_fit builds the model on meta for those)."""
    code = ("import sys; from engine.grow.operator_fit import validate_plan_file as validate_file; "
            f"_, p = validate_file({str(QUICKSTART)!r}, ['stages.1.expand=[]']); assert not p, p; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_activation_checkpointing_of_the_mlp_is_refused_at_check_time():
    raw = {"model": {"source": "builtin:mlp"}, "train": {"checkpointing": True}}
    assert plan_checks.speed_problems(raw) == [
        ("train.checkpointing", "builtin:mlp has no blocks to checkpoint — set train.checkpointing = false")]
    assert plan_checks.speed_problems({**raw, "model": {"source": "builtin:tiny-neo"}}) == []
    assert plan_checks.speed_problems({**raw, "train": {"checkpointing": False}}) == []
