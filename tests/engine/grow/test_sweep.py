"""The mapping sweep: generated mappings, mappings files, the block-by-block replay (identity ==
the unexpanded model, prefix-cached == naive == a really stacked model) and the CLI."""

from __future__ import annotations

import json
from math import comb

import pytest
import torch

from engine.grow.apply import apply_stage
from engine.grow.sweep import (
    SweepError,
    block_forwards,
    count_mappings,
    default_mappings,
    load_mappings,
    mapping_sweep,
    non_decreasing_mappings,
    stretched_mapping,
    sweep_candidates,
)
from engine.plan import ExpandSpec
from tests.conftest import widen
from tests.tiny_models import ALL_DECODER_FAMILIES, build, build_t5, token_batch

SEQ_LEN = 32


def batches(n: int = 2):
    return [token_batch(seed, rows=2, length=SEQ_LEN) for seed in range(n)]


def row_for(result: dict, mapping) -> dict:
    (row,) = [r for r in result["rows"] if r["mapping"] == mapping and not r["reference"]]
    return row


def reference_row(result: dict) -> dict:
    (row,) = [r for r in result["rows"] if r["reference"]]
    return row


# ---------------------------------------------------------------------------------------------
# generated mappings (the families: test_mapping_families.py)


@pytest.mark.parametrize("layers,depth", [(4, 4), (4, 8), (3, 6), (5, 4), (2, 5)])
def test_default_mappings_keep_ends_and_never_decrease(layers, depth):
    mappings = default_mappings(layers, depth)
    assert len(mappings) == count_mappings(layers, depth) == comb(layers + depth - 3, depth - 2)
    assert mappings == sorted(mappings) and len({tuple(m) for m in mappings}) == len(mappings)
    for m in mappings:
        assert len(m) == depth and m[0] == 0 and m[-1] == layers - 1
        assert all(a <= b for a, b in zip(m, m[1:]))
    if depth == layers:
        assert list(range(layers)) in mappings


def test_default_mappings_without_keep_ends_cover_every_non_decreasing_mapping():
    mappings = default_mappings(3, 3, keep_ends=False)
    assert len(mappings) == comb(3 + 3 - 1, 3)
    assert [0, 0, 0] in mappings and [2, 2, 2] in mappings and [0, 1, 2] in mappings


@pytest.mark.parametrize("layers,depth,limit", [(4, 4, 3), (6, 6, 4), (4, 8, 5), (8, 8, 2), (32, 48, 6)])
def test_limit_spreads_evenly_and_keeps_the_most_identity_like(layers, depth, limit):
    mappings = default_mappings(layers, depth, limit=limit)
    assert len(mappings) == limit
    assert stretched_mapping(layers, depth) in mappings  # the identity when depth == layers
    if depth == layers:
        assert list(range(layers)) in mappings
    assert mappings == sorted(mappings)
    assert mappings == default_mappings(layers, depth, limit=limit)  # deterministic
    full = count_mappings(layers, depth)
    if full <= 1000:  # a subset of the full list, first and last included unless replaced by the anchor
        everything = default_mappings(layers, depth)
        assert all(m in everything for m in mappings)


def test_stretched_mapping_is_the_source_notes_choice():
    assert stretched_mapping(4, 8) == [0, 1, 1, 1, 2, 2, 2, 3]
    assert stretched_mapping(4, 4) == [0, 1, 2, 3]


def test_too_many_non_decreasing_mappings_ask_for_a_limit_or_draw_from_the_families():
    with pytest.raises(SweepError, match="--limit"):
        non_decreasing_mappings(32, 48)
    drawn = default_mappings(32, 48)  # ~10^13 of them: the families' handfuls stand in
    assert 5 <= len(drawn) <= 30 and {len(m) for m in drawn} == {48}
    with pytest.raises(SweepError, match="depth >= 2"):
        default_mappings(4, 1)


# ---------------------------------------------------------------------------------------------
# mappings files


def test_mappings_files_json_and_toml(tmp_path):
    (tmp_path / "m.json").write_text("[[0, 1, 1, 3], [0, 2, 2, 3], [0, 1, 1, 3]]")
    (tmp_path / "m.toml").write_text("mappings = [[0, 1, 2, 3], [3, 2, 1, 0]]")
    (tmp_path / "wrapped.json").write_text('{"mappings": [[0, 0, 0, 0]]}')
    assert load_mappings(tmp_path / "m.json", 4, 4) == [[0, 1, 1, 3], [0, 2, 2, 3]]  # duplicate dropped
    assert load_mappings(tmp_path / "m.toml", 4, 4) == [[0, 1, 2, 3], [3, 2, 1, 0]]
    assert load_mappings(tmp_path / "wrapped.json", 4, 4) == [[0, 0, 0, 0]]


@pytest.mark.parametrize("text,suffix,expected", [
    ("[[0, 1, 2]]", ".json", "has 3 entries — every mapping needs 4"),
    ("[[0, 1, 2, 7]]", ".json", "uses layer 7 — the source model has layers 0..3"),
    ("[[0, 1, 2, -1]]", ".json", "uses layer -1"),
    ('[[0, 1, "a", 3]]', ".json", "not a list of layer indices"),
    ("[[0, 1, 2, 3]", ".json", "not valid JSON"),
    ("mapping = [[0, 1, 2, 3]]", ".toml", "no 'mappings' key"),
    ("mappings = [[0, 1, 2, 3]", ".toml", "not valid TOML"),
    ("[]", ".json", "non-empty list"),
])
def test_bad_mappings_files_say_what_to_fix(tmp_path, text, suffix, expected):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(SweepError) as info:
        load_mappings(path, 4, 4)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("family", ALL_DECODER_FAMILIES)
def test_identity_mapping_is_exactly_the_reference(family):
    model, _ = build(family, layers=4, heads=2, head_dim=8, ffn=16, seed=0)
    result = mapping_sweep(model, batches(), default_mappings(4, 4))
    identity, reference = row_for(result, [0, 1, 2, 3]), reference_row(result)
    assert reference["mapping"] is None
    assert abs(identity["ppl"] - reference["ppl"]) / reference["ppl"] < 1e-6
    assert len(result["rows"]) == 1 + comb(5, 2)
    assert [r["loss"] for r in result["rows"]] == sorted(r["loss"] for r in result["rows"])
    assert result["replay_check"] < 1e-6


def _stacked_ppl(family: str, mapping: list[int], data) -> float:
    """Perplexity of the model really stacked by map_layers (real copies), by its own forward."""
    model, view = build(family, layers=4, heads=2, head_dim=8, ffn=16, seed=0)
    apply_stage(model, view, 0, [ExpandSpec(op="map_layers", mapping=mapping, kinds="real")], data[0],
                torch.Generator().manual_seed(0))
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in data:
            logits = model(input_ids=inputs).logits
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            count += targets.numel()
    return float(torch.exp(torch.tensor(total / count, dtype=torch.float64)))


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_prefix_cached_equals_naive_and_the_stacked_model(family):
    model, _ = build(family, layers=4, heads=2, head_dim=8, ffn=16, seed=0)
    data = batches()
    mappings = default_mappings(4, 6, limit=8) + [[0, 1, 2, 3, 0, 3], [3, 2, 1, 0, 1, 2]]
    result = mapping_sweep(model, data, mappings)
    assert len(result["rows"]) == 1 + len(mappings)
    assert result["naive_max_loss_diff"] <= 1e-5
    assert result["block_calls"]["cached"] < result["block_calls"]["naive"]
    assert result["speedup"] > 0 and result["naive_s"] > 0 and result["cached_s"] > 0
    for mapping in mappings:  # each alone: no prefix to share, i.e. evaluated from layer 0
        swept = row_for(result, mapping)["ppl"]
        alone = row_for(mapping_sweep(model, data, [mapping], measure_naive=False), mapping)["ppl"]
        assert abs(alone - swept) <= 1e-5 * swept
    for mapping in mappings[:2] + mappings[-2:]:  # a really stacked model agrees
        swept = row_for(result, mapping)["ppl"]
        assert abs(_stacked_ppl(family, mapping, data) - swept) <= 1e-5 * swept


def test_family_candidates_are_scored_with_their_labels_and_sharing_counted():
    model, _ = build("llama", layers=4, heads=2, head_dim=8, ffn=16, seed=0)
    data = batches(1)
    candidates = sweep_candidates(4, 6, families=["dus", "band"], per_family=10)
    result = mapping_sweep(model, data, candidates)
    rows = [r for r in result["rows"] if not r["reference"]]
    assert len(rows) == len(candidates) and {r["family"] for r in rows} == {"dus", "band"}
    assert {r["label"] for r in rows} == {c.label for c in candidates}
    assert reference_row(result)["family"] is None and reference_row(result)["label"] is None
    calls = block_forwards(c.mapping for c in candidates)
    assert result["block_calls"] == {"cached": calls["shared"], "naive": calls["naive"]}
    assert result["sharing_ratio"] == pytest.approx(calls["naive"] / calls["shared"]) and result["sharing_ratio"] > 1
    assert result["naive_max_loss_diff"] <= 1e-5
    json.dumps(result)


def test_no_naive_skips_the_timing_and_the_model_mode_is_restored():
    model, _ = build("gpt_neo", layers=2, heads=2, head_dim=8, ffn=16, seed=0)
    model.train()
    result = mapping_sweep(model, batches(1), [[0, 1, 1], [0, 0, 1]], measure_naive=False)
    assert model.training
    assert result["speedup"] is None and result["naive_s"] is None and result["cached_s"] > 0
    json.dumps(result)  # plain JSON: no tensors, no NaN


def test_bad_mappings_and_seq2seq_models_are_refused():
    model, _ = build("gpt_neo", layers=2, heads=2, head_dim=8, ffn=16, seed=0)
    with pytest.raises(SweepError, match="layers 0..1"):
        mapping_sweep(model, batches(1), [[0, 2]])
    with pytest.raises(SweepError, match=r"different depths \[2, 3\]: mapping 1 has 3 layers"):
        mapping_sweep(model, batches(1), [[0, 1], [0, 1, 1]])
    t5, _ = build_t5()
    with pytest.raises(SweepError, match="t5 .seq2seq. is not supported"):
        mapping_sweep(t5, batches(1), [[0, 1]])


# ---------------------------------------------------------------------------------------------
# the CLI


def save_byte_level_neo(directory) -> None:
    """A tiny 4-layer GPT-Neo whose vocabulary fits the byte tokenizer, saved like a hub model."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=259, hidden_size=32, num_layers=4, num_heads=2,
                          attention_types=[[["global", "local"], 2]], max_position_embeddings=64,
                          window_size=16, intermediate_size=64)
    GPTNeoForCausalLM(config).save_pretrained(directory)


CLI_OPTIONS = ["--depth", "4", "--batches", "1", "--batch-size", "2", "--seq-len", str(SEQ_LEN), "--device", "cpu"]


def test_cli_sweeps_a_local_model_directory(tmp_path, widen_home, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny model: threads only contend (CI, xdist)
    save_byte_level_neo(tmp_path / "neo")
    args = ["sweep", "mapping", "--model", str(tmp_path / "neo"), *CLI_OPTIONS]
    out = widen(*args, "--json", "--csv", str(tmp_path / "rows.csv"), env_home=widen_home, check=True)
    result = json.loads(out.stdout)
    assert {"model", "task", "depth", "rows", "speedup", "naive_s", "cached_s"} <= set(result)
    assert result["task"] == "builtin:pydoc" and result["depth"] == 4 and len(result["rows"]) == 11
    reference, identity = reference_row(result), row_for(result, [0, 1, 2, 3])
    assert abs(identity["ppl"] - reference["ppl"]) / reference["ppl"] < 1e-6
    assert result["speedup"] > 0
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == 1 + 11


def test_cli_errors_are_one_line(tmp_path, widen_home):
    """In-process (the subprocess path is tested above): each problem is one `error:` line."""
    from typer.testing import CliRunner

    from widen_tui.cli import app

    save_byte_level_neo(tmp_path / "neo")
    build("gpt_neo", layers=4, heads=2, head_dim=8, ffn=16, seed=0)[0].save_pretrained(tmp_path / "small-vocab")
    build_t5(layers=2, decoder_layers=2)[0].save_pretrained(tmp_path / "t5")
    bad = tmp_path / "bad.json"
    bad.write_text("[[0, 1, 9, 3]]")
    neo = ["--model", str(tmp_path / "neo")]
    cases = [
        ([*neo, "--mappings", str(bad)], f"error: {bad}: mapping 0 ([0, 1, 9, 3]) uses layer 9 — the source "
                                         "model has layers 0..3"),
        ([*neo, "--mappings", str(tmp_path / "absent.json")], "no such file"),
        ([*neo, "--seq-len", "65"], "the model has 64 learned positions"),
        (["--model", str(tmp_path / "small-vocab")], "the tokenizer has 259 ids but the model's vocabulary has 61"),
        (["--model", str(tmp_path / "t5")], "t5 (seq2seq) is not supported"),
        ([*neo, "--family", "bandd"], "error: --family: no mapping family 'bandd' — did you mean 'band'?"),
        ([*neo, "--family", "band", "--mappings", str(bad)], "error: --family and --mappings: give one"),
        ([*neo, "--family", "dus", "--depth", "9"], "error: --family: dus gives no mapping of 9 layers over 4 — "
                                                     "dus fits d < D ≤ 2d"),
    ]
    for args, expected in cases:
        out = CliRunner().invoke(app, ["sweep", "mapping", *CLI_OPTIONS, *args])
        assert out.exit_code == 1, out.output
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
        assert expected in out.stderr


def test_cli_draws_from_families(tmp_path, widen_home, monkeypatch):
    """In-process: `--family` picks the mappings; each row of the table and the JSON names its family."""
    from typer.testing import CliRunner

    from widen_tui.cli import app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    save_byte_level_neo(tmp_path / "neo")
    args = ["sweep", "mapping", "--model", str(tmp_path / "neo"), *CLI_OPTIONS, "--depth", "6",
            "--family", "dus", "--family", "band:times=3", "--no-naive"]
    out = CliRunner().invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["families"] == ["dus", "band:times=3"] and result["depth"] == 6
    labels = {r["label"] for r in result["rows"] if not r["reference"]}
    assert {"dus drop 1+1", "band 1:2 ×3"} <= labels and result["sharing_ratio"] > 1
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0 and "dus drop 1+1" in table.stdout and "fewer than from layer 0" in table.stdout
