"""`widen plan check` and `widen plan show`: a plan validated, or built and grown without training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engine.errors import WidenError
from widen_tui.cli.common import CLIError, console, load_plan_or_exit, print_json

plan_app = typer.Typer(help="Check expansion plans.", no_args_is_help=True)



@plan_app.command("check")
def plan_check(
    file: Annotated[Path, typer.Argument(help="plan TOML file")],
    set_: Annotated[list[str], typer.Option("--set", help="override a field: key.path=value (repeatable)")] = [],
):
    """Validate a plan: schema, tasks, operators, and layer indices against the model's config; then
    apply its operators to the model built on the meta device (no weights) to catch misfits."""
    from rich.markup import escape

    plan = load_plan_or_exit(file, set_, None)
    stages = f"{len(plan.stages)} stage{'s' if len(plan.stages) != 1 else ''}"
    if plan.variants:
        stages = (f"{len(plan.stages)} shared stage{'s' if len(plan.stages) != 1 else ''}, {len(plan.variants)} "
                  f"variants ({', '.join(v.name for v in plan.variants)})")
    extras = [x for x, on in (("task-specific modules", plan.task_modules), ("mapping sweep", plan.sweep)) if on]
    summary = (f"{file}: {stages}, tasks {', '.join(plan.tasks)}, model {plan.model.source}"
               + "".join(f", {x}" for x in extras))
    console.print(f"[green]ok[/green] {escape(summary)}", highlight=False)


@plan_app.command("show")
def plan_show(
    file: Annotated[Path, typer.Argument(help="plan TOML file")],
    set_: Annotated[list[str], typer.Option("--set", help="override a field: key.path=value (repeatable)")] = [],
    as_json: Annotated[bool, typer.Option("--json", help="print the per-operator reports as a JSON list")] = False,
    meta: Annotated[bool, typer.Option("--meta", help="parameter counts only, on PyTorch's meta device: no "
                                       "weights are loaded (large models; automatic for a directory "
                                       "holding a config but no weights); no preservation figures")] = False,
):
    """Build the model and apply every stage's operators without training: parameters added,
    trainable share, and preservation (max |Δlogits|, loss before/after) per operator."""
    plan = load_plan_or_exit(file, set_, None)
    from engine.model.sources import is_config_only

    if meta or is_config_only(plan.model.source):
        _show_meta_preview(plan, as_json, why="" if meta else f"{plan.model.source} holds a config but no weights")
        return
    from engine.exports.hf_directory import build_from_plan, quiet_transformers
    from engine.model.view import count_params
    from widen_tui.views.report import expansions_table

    quiet_transformers()
    arms = [(v.name, plan.for_variant(v.name)) for v in plan.variants] or [(None, plan)]
    everything = {}
    for variant, resolved in arms:
        try:
            model, view, _, reports = build_from_plan(resolved)
        except WidenError as e:
            raise CLIError(f"{'variant ' + variant + ': ' if variant else ''}{e}") from None
        everything[variant] = reports
        if as_json:
            continue
        console.print(f"{plan.name}{' · variant ' + variant if variant else ''}: {resolved.model.source} "
                      f"({view.family.name}), {len(resolved.stages)} stages, {count_params(model):,} parameters "
                      "after every operator (no training)", highlight=False)
        if reports:
            console.print(expansions_table(reports))
        else:
            console.print("the plan applies no operators", highlight=False)
        if any(s.grow for s in resolved.stages):
            console.print("automatic growths (stages.grow) happen during training and are not applied here",
                          highlight=False)
    if as_json:
        print_json(everything[None] if list(everything) == [None] else everything)


def _show_meta_preview(plan, as_json: bool, why: str) -> None:
    """The builder's parameter preview (engine.grow.preview: the real operators on a model without
    storage): exact counts per stage and operator, in seconds for a 7B config."""
    from engine.grow.preview import preview_plan, to_json
    from engine.model.sources import load_config
    from widen_tui.views.preview_rows import preview_table

    preview = preview_plan(plan.model_dump(mode="json"), load_config=load_config)
    if preview.base_total is None:
        raise CLIError(f"{preview.error_field + ': ' if preview.error_field else ''}{preview.error}")
    if as_json:
        print_json(to_json(preview))
        return
    console.print(f"{plan.name}: {plan.model.source}, parameter counts on the meta device "
                  f"({why + '; ' if why else ''}no weights loaded, no preservation figures)", highlight=False)
    console.print(preview_table(preview))
