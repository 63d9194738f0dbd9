"""The operator registry walked end to end: every op is described once (``engine.ops.params.OPS``)
with a schema, an importable implementation, capabilities that agree with its schema, a place in
the builder and a row of docs/operators.md, and that page's table is the generated one."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from engine.ops import docs
from engine.ops.params import (
    OPS,
    LayeredOpParams,
    OpDescriptor,
    OpParams,
    applicable_families,
    operators_table_markdown,
    register_op,
)

ROOT = Path(__file__).resolve().parents[3]


def _literal_values(annotation) -> set:
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return {v for arg in typing.get_args(annotation) for v in _literal_values(arg)}


def descriptor_problems(d: OpDescriptor, page_table: str) -> list[str]:
    """What is missing or inconsistent in one descriptor ([] when it is complete)."""
    problems = []
    if not (isinstance(d.schema, type) and issubclass(d.schema, OpParams)):
        return [f"{d.name}: schema {d.schema!r} is not an OpParams model"]
    if d.schema.model_fields["op"].default != d.name:
        problems.append(f"{d.name}: the schema's op is {d.schema.model_fields['op'].default!r}")
    try:
        fn = d.load()
    except (ImportError, AttributeError) as e:
        problems.append(f"{d.name}: implementation {d.implementation!r} does not import: {e}")
    else:
        if not callable(fn) or len(inspect.signature(fn).parameters) != 3:
            problems.append(f"{d.name}: {d.implementation} is not fn(view, params, generator)")
    mode = d.schema.model_fields.get("mode")
    has_parallel = mode is not None and "parallel" in _literal_values(mode.annotation)
    if d.parallel_mode != has_parallel:
        problems.append(f"{d.name}: parallel_mode = {d.parallel_mode} but the schema "
                        f"{'has' if has_parallel else 'has no'} mode = \"parallel\"")
    if d.parallel_mode and not d.task_module:
        problems.append(f"{d.name}: a parallel mode exists to make task modules, but task_module is False")
    if not d.summary:
        problems.append(f"{d.name}: the schema has no docstring (the builder's one-line summary)")
    for key in ("does", "exact", "adds"):
        if not getattr(d, key).strip():
            problems.append(f"{d.name}: no docs text for {key!r}")
    if not applicable_families(d):  # from the family table: the kinds it takes, less the refusals
        problems.append(f"{d.name}: no family takes it (model_kinds {d.model_kinds}, every family refuses it)")
    if f"| `{d.name}` |" not in page_table:
        problems.append(f"{d.name}: no row in docs/operators.md — run `{docs.REGENERATE}`")
    return problems


def _page_table() -> str:
    return docs.page_table(docs.PAGE.read_text(encoding="utf-8"))


def test_every_op_is_fully_described():
    table = _page_table()
    assert len(OPS) >= 12
    problems = [p for d in OPS.values() for p in descriptor_problems(d, table)]
    assert problems == []


def test_the_descriptors_are_the_one_table():
    import engine.ops.params as params

    assert not hasattr(params, "OP_PARAMS")  # no second table keyed by op name
    assert all(d.name == name for name, d in OPS.items())
    orders = [d.builder_order for d in OPS.values()]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)
    assert {n for n, d in OPS.items() if d.parallel_mode} == {"widen_ffn", "widen_mlp"}
    assert {n for n, d in OPS.items() if d.task_module} == {"lora", "ia3", "widen_ffn", "widen_mlp",
                                                              "parallel_linear", "concat_linear"}


def test_docs_table_is_generated_from_the_descriptors():
    assert _page_table() == operators_table_markdown(), (
        f"docs/operators.md's operators table is stale — regenerate it with `{docs.REGENERATE}`")


def test_a_new_op_is_caught_by_the_walk(monkeypatch):
    """An op registered without an implementation, with a mode the capabilities do not declare, and
    without a docs row fails the walk; the page is then stale."""
    monkeypatch.setattr("engine.ops.params.OPS", dict(OPS))
    import engine.ops.params as params

    @register_op(implementation="engine.ops.width:no_such_operator", builder_order=10_000, does="grows x",
                 exact="yes", adds="nothing", families="neo")
    class GrowXParams(LayeredOpParams):
        """Grow x."""

        op: typing.Literal["grow_x"] = "grow_x"
        mode: typing.Literal["parallel", "inplace"] = "parallel"

    d = params.OPS["grow_x"]
    assert d.schema is GrowXParams and list(params.OPS)[-1] == "grow_x"
    problems = descriptor_problems(d, _page_table())
    assert any("does not import" in p for p in problems)
    assert any("parallel_mode = False" in p for p in problems)
    assert any("no row in docs/operators.md" in p for p in problems)
    assert "| `grow_x` | grows x | yes | nothing | gathers the model whole | gpt_neo, gpt2" in params.operators_table_markdown()
    assert params.operators_table_markdown() != _page_table()
    assert "grow_x" not in OPS  # the real registry is untouched


@pytest.mark.parametrize("kwargs, message", [
    ({"implementation": "engine.ops.width"}, "is not 'module:function'"),
    ({"builder_order": 10}, "builder_order 10 is already widen_ffn's"),
])
def test_register_op_refuses_incomplete_descriptors(kwargs, message):
    fields = {"implementation": "engine.ops.width:widen_ffn", "builder_order": 10_001, "does": "d", "exact": "e",
              "adds": "a", "families": "f", **kwargs}

    class OtherParams(LayeredOpParams):
        op: typing.Literal["other_op"] = "other_op"

    with pytest.raises(ValueError, match=re.escape(message)):
        register_op(**fields)(OtherParams)
    with pytest.raises(ValueError, match="already registered"):
        register_op(**{**fields, "builder_order": 10_002})(OPS["lora"].schema)
    with pytest.raises(TypeError):
        register_op(implementation="engine.ops.width:widen_ffn", builder_order=10_003)  # no docs fields
    assert "other_op" not in OPS


def test_operators_table_escapes_pipes():
    table = operators_table_markdown()
    assert "`symmetry = split \\| noise`" in table
    for row in table.splitlines()[2:]:
        assert len(re.findall(r"(?<!\\)\|", row)) == 7, row


def test_docs_command_rewrites_only_the_table(tmp_path, monkeypatch):
    page = tmp_path / "operators.md"
    text = docs.PAGE.read_text(encoding="utf-8")
    stale = docs.with_table(text, "| op |\n")
    page.write_text(stale, encoding="utf-8")
    monkeypatch.setattr(docs, "PAGE", page)
    assert docs.main(["--check"]) == 1
    assert docs.main([]) == 0
    assert page.read_text(encoding="utf-8") == text
    assert docs.main(["--check"]) == 0


def test_builder_offers_the_ops_in_builder_order():
    from widen_tui.tui.widgets.operator_editor import op_choices, op_summary

    assert [name for name, _ in op_choices()] == sorted(OPS, key=lambda n: OPS[n].builder_order)
    assert op_summary("lora") == OPS["lora"].summary
    assert op_summary("lora").startswith("Low-rank adapters (PEFT LoRA)")
    assert op_summary("no_such_op") == "" and op_summary(None) == ""


def test_task_module_message_lists_the_capable_ops():
    from engine.plan.checks import supported_text, task_module_problems

    text = supported_text()
    assert text.startswith('widen_ffn / widen_mlp with mode = "parallel", ')
    for name, d in OPS.items():
        assert (name in text) == d.task_module
    [(field, message)] = task_module_problems({"op": "insert_identity"})
    assert field == "op" and text in message


def test_descriptors_stay_torch_free():
    code = ("import sys; import engine.ops.params, engine.ops.docs, engine.grow.task_modules, engine.plan; "
            "engine.ops.params.operators_table_markdown(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("op", ["widen_ffn", "widen_mlp"])
def test_the_default_mode_follows_the_init(op):
    """`init = "net2net"` alone just works (a split rewrites the original units: in place); the
    other inits keep the parallel default; an explicit parallel split is still refused."""
    schema = OPS[op].schema
    assert schema(size=4, init="net2net").mode == "inplace"
    assert schema(size=4, init="copy_halve").mode == "inplace"
    assert schema(size=4).mode == "parallel" and schema(size=4, init="random").mode == "parallel"
    with pytest.raises(ValueError, match='set mode = "inplace"'):
        schema(size=4, init="net2net", mode="parallel")


def test_a_net2net_growth_without_mode_passes_plan_check(tmp_path):
    from engine.plan import load_plan

    plan = tmp_path / "plan.toml"
    plan.write_text('name = "n2n"\n[model]\nsource = "builtin:tiny-neo"\ntokenizer = "bytes"\n'
                    '[tasks.python]\nsource = "builtin:stdlib-python"\n'
                    '[[stages]]\ntask = "python"\nsteps = 2\n'
                    '[[stages.expand]]\nop = "widen_ffn"\nsize = 8\ninit = "net2net"\n')
    [stage] = load_plan(plan).stages
    assert stage.expand[0].params().mode == "inplace"
