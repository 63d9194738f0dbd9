"""results.json: what a run measured, in one document (the CLI, the TUI, compare and plot read it).

Built from the trainer's history: the evaluation matrix R[row][task] (loss, perplexity, bits per
byte, and generation scores where a task has them), the continual-learning figures over bits per
byte (ACC, BWT, FWT, forgetting — conventions in engine.runs.forgetting), parameters per stage, every
expansion report (stage operators and automatic growths), and a summary with cost figures.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from engine.runs import forgetting as metrics

GENERATION_SCORES = ("exact_match", "bleu")


def build_results(identity: dict, tasks: list[str], history: dict, params: int, memory: dict,
                  sweep: dict | None = None, active_params: int | None = None) -> dict:
    """`identity`: run, plan, state, seed, variant, group; `history`: the trainer's; `memory`:
    peak_rss_mb and torch_peak_mb; `params` / `active_params`: the final model's parameters, all of
    them and those a token goes through (``engine.model.view.active_params``; default: all)."""
    h = history
    matrix = h["matrix"]
    continual = metrics.continual_summary(matrix, h["trained_at"]) if matrix else {}
    forgetting = continual.get("forgetting", {})
    final = matrix[-1] if matrix else {}
    scores = sorted({k for row in matrix for t in row for k in row[t] if k in GENERATION_SCORES})
    last_stage = h["stage_params"][-1] if h["stage_params"] else {}
    summary = {
        "final_ppl": {t: final[t]["ppl"] for t in final},
        "final_bpb": {t: final[t]["bpb"] for t in final},
        "final_scores": {t: {k: final[t][k] for k in scores if k in final[t]} for t in final
                         if any(k in final[t] for k in scores)},
        "forgetting": {t: (f["absolute"] if f else None) for t, f in forgetting.items()},
        "forgetting_metric": metrics.COMPARABLE_METRIC,
        "acc": continual.get("acc"), "bwt": continual.get("bwt"), "fwt": continual.get("fwt"),
        "params": params,
        "active_params": params if active_params is None else active_params,
        "params_added": sum(r["params_added"] for r in h["expansions"]),
        "trainable": last_stage.get("trainable"),
        "trainable_share": last_stage.get("trainable_share"),
        "max_abs_logit_delta": max((r["max_abs_logit_delta"] for r in h["expansions"]), default=None),
        "growths": len(h["growths"]),
        "tokens": h["tokens"],
        "flops": h["flops"],
        "wall_s": round(h["wall_s"], 2),
        "tokens_per_s": h["tokens"] / h["wall_s"] if h["wall_s"] else None,
        "peak_rss_mb": memory.get("peak_rss_mb"),
        "torch_peak_mb": memory.get("torch_peak_mb"),
        "prefix_cached": h.get("prefix_cached", False),
    }
    out = {
        **identity,
        "tasks": tasks,
        "sign_convention": metrics.SIGN_CONVENTION,
        "forgetting_definition": metrics.FORGETTING_DEFINITION,
        "matrix": {"rows": h["row_labels"], "tasks": tasks,
                   **{key: [[r[t].get(key) for t in tasks] for r in matrix]
                      for key in ("loss", "ppl", "bpb", *scores)}},
        "continual": {k: v for k, v in continual.items() if k != "forgetting"},
        "forgetting": {"bpb": forgetting,
                       "loss": metrics.forgetting(matrix, h["trained_at"], "loss") if matrix else {},
                       "ppl": metrics.forgetting(matrix, h["trained_at"], "ppl") if matrix else {}},
        "stages": h["stage_params"],
        "expansions": h["expansions"],
        "growths": h["growths"],
        "summary": summary,
    }
    if sweep:
        out["sweep"] = sweep
    return out


def write_ending(trainer, state: str, error: str | None = None) -> None:
    """A trainer's ending (engine.train.loop.Trainer, rank 0): results.json (once set up), a status
    event, status.json. Each write is tried on its own, so a full disk loses as little as it can."""
    from engine.model.view import active_params, count_params
    from engine.runs.rundir import write_json_atomic

    extra = {"error": error} if error else {}
    if trainer.started:
        trainer._maybe_system_sample(force=True, quiet=True)
        sample = trainer.monitor.sample()
        identity = {"run": trainer.run.id, "plan": trainer.plan.name, "state": state, "seed": trainer.plan.seed,
                    "variant": trainer.info.get("variant"), "group": trainer.info.get("group")}
        memory = {"peak_rss_mb": trainer.monitor.peak_rss_mb, "torch_peak_mb": sample.get("torch_peak_mb")}
        document = build_results(identity, list(trainer.tasks), asdict(trainer.history), count_params(trainer.model),
                                 memory, getattr(trainer, "sweep_result", None), active_params(trainer.model))
        try:
            write_json_atomic(trainer.run.results_json, {**document, **extra})
        except OSError:
            pass
        try:
            trainer.emit("status", state=state, **extra)
        except OSError:
            pass
    trainer.status.close(state=state, ended=time.time(), **extra)
    trainer.run.cancel_request.unlink(missing_ok=True)
