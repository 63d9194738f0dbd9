"""The generation task in a real run on a T5-style model (seq2seq): the encoder reads the
docstring prompt, the decoder is trained on the code continuation, and every stage scores exact
match and BLEU-4 — through a local model directory (the hub code path)."""

from __future__ import annotations

import textwrap

import pytest

from engine.plan import load_plan
from engine.runs.events import read_all
from engine.train.loop import Trainer
from widen_tui.launcher import create_run

pytestmark = pytest.mark.slow


def test_seq2seq_generation_run_with_an_expansion(tmp_path, widen_home):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(textwrap.dedent(f"""
        name = "tiny-seq2seq"
        [model]
        source = "{tmp_path / 't5'}"
        [tasks.code]
        source = "builtin:docstring-code"
        max_docs = 200
        generate_examples = 2
        max_new_tokens = 6
        [train]
        batch_size = 4
        seq_len = 64
        eval_batches = 1
        eval_interval = 0
        device = "cpu"
        [[stages]]
        task = "code"
        steps = 3
        [[stages]]
        task = "code"
        steps = 3
        freeze = "base"
        [[stages.expand]]
        op = "widen_ffn"
        size = 8
    """))
    run = create_run(load_plan(plan_path), plan_path, widen_home)
    Trainer(run.path).run_plan()
    results = run.results()
    assert results["state"] == "done"
    (expansion,) = results["expansions"]
    assert expansion["exact"] and expansion["max_abs_logit_delta"] < 1e-5   # probe on (prompt, continuation)
    matrix = results["matrix"]
    assert len(matrix["bleu"]) == 3 and all(row[0] is not None for row in matrix["exact_match"])
    assert matrix["loss"][2][0] < matrix["loss"][0][0]
    reported = {(e.phase, e.what) for e in read_all(run.events) if e.type == "progress"}
    assert ("generate", "code") in reported  # decoding the examples shows, not a frozen screen
