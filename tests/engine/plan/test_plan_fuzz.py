"""Property: for any mutation of a shipped plan, `plan check` either finds problems — each one line —
or passes, and then a tiny run of the plan ends `done` or with widen's own one-line error.

Mutations of the embedded experiments (builtin model and tasks, no network): a leaf set to a value
of any type (ints huge and negative, inf/nan, bools, long and path-like text, lists, tables), a key
deleted, a task renamed, an unknown key added. Numbers are drawn from small values and from the
edges (0, -1, 2**32, 2**63, 10**18, ...), not from the expensive middle (a valid size of 40,000
is a slow run, not a bug); strings never name an existing path (a task source "/" would read the
whole filesystem — valid, and slow).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import tomllib
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.plan import PlanError, plan_from_dict, validate_file

# No network: a hub-shaped name (model, tokenizer, dataset) must fail fast, never wait on a socket.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

ROOT = Path(__file__).resolve().parents[3]
PLANS = ["quickstart", "compare_strategies", "progressive_growth", "mapping_sweep", "init_failure_modes"]
RAW = {name: tomllib.loads((ROOT / "experiments" / f"{name}.toml").read_text()) for name in PLANS}


@pytest.fixture(scope="module")
def offline():
    """The offline switches huggingface_hub / datasets read at import, in case they were
    imported before this module set the environment."""
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        import datasets.config as dsc

        saved_ds = dsc.HF_HUB_OFFLINE
        dsc.HF_HUB_OFFLINE = dsc.HF_DATASETS_OFFLINE = True
    except ImportError:  # pragma: no cover
        dsc = None
    yield
    hub.HF_HUB_OFFLINE = saved
    if dsc is not None:
        dsc.HF_HUB_OFFLINE = dsc.HF_DATASETS_OFFLINE = saved_ds


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-runs")  # one root: the corpus cache is shared by the runs


# ---------------------------------------------------------------------------------------------
# values and mutations


def _not_a_path(text: str) -> bool:
    try:
        return not Path(text).expanduser().exists()
    except (OSError, ValueError, RuntimeError):
        return True


INTS = st.one_of(st.integers(-3, 64), st.sampled_from(
    [0, 1, 2, -1, 2**31 - 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, -(2**63), 10**18, 2**80, 10**9, 10**9 + 1]))
FLOATS = st.one_of(st.floats(-1e3, 1e3), st.sampled_from(
    [math.inf, -math.inf, math.nan, 1e300, -1e300, 1e-300, 0.0, -0.0, 0.5, 1e4, 1e4 + 1, 0.95]))
STRINGS = st.one_of(
    st.sampled_from(["", "all", "none", "base", "cpu", "cuda", "auto", "float16", "bfloat16", "bytes", "plateau",
                     "builtin:pydoc", "builtin:stdlib-python", "builtin:docstring-code", "builtin:nope",
                     "builtin:mlp", "builtin:tiny-neo", "../../../../../../x", "/nonexistent/x", "./missing.txt",
                     "~nouser/x", "a\nb", "[tasks.x]", "[[stages]]", "x" * 100_000, "q", "up", "widen_ffn",
                     "lora", "insert_identity", "encoder", "generation", "text", "prose", "python"]),
    st.text(max_size=12).filter(_not_a_path))
SCALARS = st.one_of(INTS, FLOATS, st.booleans(), STRINGS)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4),
                   st.dictionaries(st.text(min_size=1, max_size=8), SCALARS, max_size=3))


def like(value):
    """Values of the type `value` has: most of them pass the schema, so the run is exercised."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return INTS
    if isinstance(value, float):
        return st.one_of(FLOATS, INTS)
    if isinstance(value, str):
        return STRINGS
    return st.lists(INTS, max_size=6)


def paths(node, prefix=()) -> list[tuple]:
    """Every key path into a raw plan (tables, lists and leaves)."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        out.append(prefix + (key,))
        out += paths(value, prefix + (key,))
    return out


def leaf_paths(raw) -> list[tuple]:
    return [p for p in paths(raw) if not isinstance(get(raw, p), (dict, list)) or get(raw, p) == []]


def table_paths(raw) -> list[tuple]:
    return [()] + [p for p in paths(raw) if isinstance(get(raw, p), dict)]


def get(raw, path):
    for key in path:
        raw = raw[key]
    return raw


@st.composite
def mutations(draw):
    """(plan name, mutated raw dict, a description, the mutated path)."""
    name = draw(st.sampled_from(PLANS))
    raw = copy.deepcopy(RAW[name])
    kind = draw(st.sampled_from(["set", "set", "delete", "rename_task", "add_key"]))
    if kind == "set":
        path = draw(st.sampled_from(leaf_paths(raw)))
        value = draw(st.one_of(VALUES, like(get(raw, path))))  # any type, or the field's own
        get(raw, path[:-1])[path[-1]] = value
        return name, raw, f"set {path} = {value!r:.80}", path
    if kind == "delete":
        path = draw(st.sampled_from(paths(raw)))
        parent = get(raw, path[:-1])
        del parent[path[-1]]
        return name, raw, f"delete {path}", path
    if kind == "rename_task":
        old = draw(st.sampled_from(list(raw["tasks"])))
        new = draw(st.one_of(st.sampled_from(["../../../../../../x", "prose2", "a b", ".hidden", "x" * 70, "ok.name",
                                              "con", "a/b", "a\\b", "x\n"]), st.text(min_size=1, max_size=10)))
        raw["tasks"] = {new if k == old else k: v for k, v in raw["tasks"].items()}
        if draw(st.booleans()):  # follow the rename in every reference, so that the plan may pass
            for stage in _all_stages(raw):
                if stage.get("task") == old:
                    stage["task"] = new
            if isinstance(raw.get("sweep"), dict) and raw["sweep"].get("task") == old:
                raw["sweep"]["task"] = new
        return name, raw, f"rename task {old!r} -> {new!r:.80}", ("tasks", new)
    path = draw(st.sampled_from(table_paths(raw)))
    key = draw(st.one_of(st.text(min_size=1, max_size=10), st.sampled_from(["bogus", "a\nb", "x" * 200])))
    value = draw(VALUES)
    get(raw, path)[key] = value
    return name, raw, f"add {path + (key,)} = {value!r:.80}", path + (key,)


def _all_stages(raw) -> list[dict]:
    stages = [s for s in raw.get("stages", []) if isinstance(s, dict)]
    for variant in raw.get("variants", []):
        if isinstance(variant, dict) and isinstance(variant.get("stages"), list):
            stages += [s for s in variant["stages"] if isinstance(s, dict)]
    return stages


# ---------------------------------------------------------------------------------------------
# the tiny run


def tiny(raw: dict) -> dict:
    """The plan's costs cut to seconds (batch 2, 16 tokens, one eval batch, at most 2 steps a
    stage, no periodic evals, no decoding); a mutated value that is cheaper than that is kept."""
    raw = copy.deepcopy(raw)
    train = raw.setdefault("train", {})
    for key, value in (("batch_size", 2), ("seq_len", 16), ("eval_batches", 1)):
        current = train.get(key)
        train[key] = current if isinstance(current, int) and not isinstance(current, bool) and \
            current < value else value
    train["eval_interval"] = 0
    for stage in _all_stages(raw):
        steps = stage.get("steps")
        if isinstance(steps, int) and not isinstance(steps, bool):
            stage["steps"] = min(steps, 2)
            grow = stage.get("grow")
            at = grow.get("at_steps") if isinstance(grow, dict) else None
            if isinstance(at, list) and at and all(isinstance(s, int) and not isinstance(s, bool) for s in at) \
                    and stage["steps"] >= 2 and max(at) >= stage["steps"]:
                grow["at_steps"] = [1]  # growth points inside the shortened stage (one growth)
                grow.pop("max_growths", None)
    for task in raw.get("tasks", {}).values():
        task["generate_examples"] = 0
        task["max_new_tokens"] = min(task.get("max_new_tokens", 8), 8)
        task["max_docs"] = min(task.get("max_docs", 40), 40)
    return raw


def tiny_run(raw: dict, touched: tuple, root: Path) -> dict:
    from engine.runs.rundir import RunDir
    from engine.train import session
    from widen_tui.launcher import create_run

    plan = plan_from_dict(tiny(raw))  # the tiny settings are valid wherever the mutation is
    if plan.variants:
        index = 0  # the variant the mutation touched, else the first
        if len(touched) > 1 and touched[0] == "variants" and isinstance(touched[1], int):
            index = min(touched[1], len(plan.variants) - 1)
        plan = plan.for_variant(plan.variants[index].name)
    run = create_run(plan, None, root=root)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = session.run(run.path)
    status = RunDir(run.path).status()
    state, error = status.get("state"), status.get("error")
    assert state in ("done", "failed", "diverged"), status
    if state == "done":
        assert code == 0, status
        return status
    assert code != 0, status
    assert isinstance(error, str) and error and "\n" not in error, status
    # widen's own error: an unexpected exception (a traceback in stderr) is a check the plan lacks
    assert "Traceback" not in stderr.getvalue(), f"{error}\n{stderr.getvalue()[-3000:]}"
    return status


# ---------------------------------------------------------------------------------------------
# the property


@settings(max_examples=25, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(mutation=mutations())
def test_mutated_plans_pass_and_run_or_fail_in_one_line(mutation, tmp_path, runs_root, offline):
    name, raw, described, touched = mutation
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    try:
        plan, problems = validate_file(path)
    except Exception as e:  # noqa: BLE001 - the checker must not raise on any plan
        pytest.fail(f"{name}: {described}: validate_file raised {e.__class__.__name__}: {e}")
    if problems:
        assert plan is None
        for problem in problems:
            text = str(problem)
            assert text and "\n" not in text and "Traceback" not in text, (described, text)
        return
    try:
        tiny_run(raw, touched, runs_root)
    except PlanError as e:
        pytest.fail(f"{name}: {described}: the plan passed the check but its tiny version did not: {e}")
    except AssertionError as e:
        raise AssertionError(f"{name}: {described}: {e}") from None
