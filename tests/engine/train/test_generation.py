"""engine.train.generation: docstring -> code pairs, the split by module, continuation-only batches for
causal and seq2seq models, the cache, greedy decoding and exact match / BLEU-4. Tiny and offline."""

from __future__ import annotations

import ast
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.model.forward import batch_to, forward_logits, loss_of, slice_batch
from engine.plan import ModelSpec, TaskSpec
from engine.train import generation as G
from engine.train.data import ByteTokenizer, DataError, is_held_out

PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def byte_tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def pairs():
    return G.docstring_code_pairs()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def causal_data(byte_tok, cache_dir, pairs):
    with pytest.MonkeyPatch.context() as patch:  # the pairs are built once per module
        patch.setattr(G, "docstring_code_pairs", lambda: pairs)
        return G.load_generation_task("code", TaskSpec(source="builtin:docstring-code"), byte_tok, cache_dir,
                                      "causal_lm")


@pytest.fixture(scope="module")
def tiny_neo():
    from engine.model.sources import load_model

    model, _ = load_model(ModelSpec(source="builtin:tiny-neo"), seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_t5():
    from tests.tiny_models import build_t5

    model, _ = build_t5()
    model.resize_token_embeddings(ByteTokenizer.vocab_size)  # byte ids; build_t5 has a 61-id vocabulary
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the built-in corpus


def test_docstring_pairs_are_real_functions(pairs):
    assert len(pairs) > 1000
    for pair in pairs:
        tree = ast.parse(pair.prompt + pair.continuation)  # prompt + continuation is the function
        (function,) = tree.body
        assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert pair.prompt.lstrip().startswith(("def ", "async def "))
        # the prompt is the signature and ends with the docstring, as written in the source
        docstring = ast.get_source_segment(pair.prompt + pair.continuation, function.body[0])
        assert isinstance(function.body[0].value.value, str) and pair.prompt.rstrip().endswith(docstring)
        # the continuation is the body after the docstring: it parses when wrapped back in a def
        body = ast.parse("def wrapped():\n" + pair.continuation).body[0].body
        assert ast.dump(ast.Module(body, [])) == ast.dump(ast.Module(function.body[1:], []))
        assert not G._is_trivial(body)
        assert len((pair.prompt + pair.continuation).encode()) <= G.MAX_PAIR_BYTES
        assert len(pair.continuation.encode()) <= G.MAX_CONTINUATION_BYTES
        assert pair.pair_id.startswith(pair.group + ":")


def test_docstring_in_prompt_as_in_source(pairs):
    pair = next(p for p in pairs if p.pair_id.endswith(":gettempdirb"))
    assert pair.prompt == 'def gettempdirb():\n    """Returns tempfile.tempdir as bytes."""\n'
    assert pair.continuation == "    return _os.fsencode(_gettempdir())\n"
    method = next(p for p in pairs if p.group.endswith(".py") and p.prompt.startswith("def __init__(self"))
    assert not method.prompt.startswith(" ")  # methods are dedented by their def's indentation
    assert method.continuation.startswith((" ", "\t"))


def test_docstring_pairs_deterministic(pairs):
    assert G.docstring_code_pairs() == pairs


def test_split_holds_out_whole_modules(pairs):
    train, evals = G.split_pairs(pairs, 0.1)
    train_modules, eval_modules = {p.group for p in train}, {p.group for p in evals}
    assert train and evals and not train_modules & eval_modules
    assert all(is_held_out(module, 0.1) for module in eval_modules)
    assert len(train) + len(evals) == len(pairs)
    assert (train, evals) == G.split_pairs(list(pairs), 0.1)


def test_split_of_a_single_module_splits_pairs():
    pairs = [G.Pair("m.py", f"m.py:{i}:f", f"def f{i}():\n", "    return 1\n") for i in range(10)]
    train, evals = G.split_pairs(pairs, 0.2)
    assert train and evals and len(train) + len(evals) == 10


def test_load_counts_sizes_and_cache(byte_tok, cache_dir, causal_data, pairs):
    data = causal_data
    train, evals = G.split_pairs(pairs, 0.1)
    assert (data.train_docs, data.eval_docs) == (len(train), len(evals))
    assert data.eval_target_texts == [p.continuation for p in evals]
    assert data.eval_bytes == sum(len(p.continuation.encode()) for p in evals)
    assert data.eval_tokens == data.eval_bytes + len(evals)  # byte tokens + one eos each
    assert byte_tok.decode(data.eval_prompts[0]) == evals[0].prompt
    # the cache: same arrays, and scoring fields do not rebuild it
    spec = TaskSpec(source="builtin:docstring-code", generate_examples=3, max_new_tokens=7)
    again = G.load_generation_task("code", spec, byte_tok, cache_dir, "seq2seq")
    assert again.from_cache and not data.from_cache
    assert again.eval_target_texts == data.eval_target_texts
    assert all(np.array_equal(a, b) for a, b in zip(again.train_prompts, data.train_prompts))
    assert len(list((cache_dir / "generation").iterdir())) == 1


def test_task_kind_default():
    assert TaskSpec(source="builtin:docstring-code").task_kind == "generation"
    assert TaskSpec(source="builtin:pydoc").task_kind == "text"


# ---------------------------------------------------------------------------------------------
# batches


def test_causal_batch_masks_prompt_and_padding():
    prompt, continuation = np.array([10, 11, 12]), np.array([20, 21])
    x, y = G.causal_batch([prompt], [continuation], 8, PAD, EOS)
    assert x.tolist() == [[10, 11, 12, 20, 21, PAD, PAD, PAD]]
    assert y.tolist() == [[-100, -100, 20, 21, EOS, -100, -100, -100]]
    assert x.dtype == y.dtype == np.int64


def test_causal_batch_cuts_the_prompt_from_the_left():
    prompt, continuation = np.arange(100, 120), np.array([20, 21, 22])
    x, y = G.causal_batch([prompt], [continuation], 8, PAD, EOS)
    assert x.tolist() == [[115, 116, 117, 118, 119, 20, 21, 22]]
    assert y.tolist() == [[-100, -100, -100, -100, 20, 21, 22, EOS]]
    # a continuation longer than the window keeps its start and one prompt token
    x, y = G.causal_batch([prompt], [np.arange(30, 42)], 8, PAD, EOS)
    assert x[0, 0] == 119 and y.tolist() == [list(range(30, 38))]


def test_seq2seq_batch_shifts_right():
    (enc, dec), y = G.seq2seq_batch([np.array([10, 11, 12]), np.arange(100, 120)],
                                    [np.array([20, 21]), np.array([30])], 6, PAD, EOS, decoder_start_id=5)
    assert enc.tolist() == [[10, 11, 12, PAD, PAD, PAD], [114, 115, 116, 117, 118, 119]]
    assert dec.tolist() == [[5, 20, 21, PAD, PAD, PAD], [5, 30, PAD, PAD, PAD, PAD]]
    assert y.tolist() == [[20, 21, EOS, -100, -100, -100], [30, EOS, -100, -100, -100, -100]]


def test_data_batches_stateless_and_masked(causal_data, byte_tok, cache_dir):
    data = causal_data
    x, y = data.train_batch(4, 96, seed=0, stage=1, step=5)
    x2, y2 = data.train_batch(4, 96, seed=0, stage=1, step=5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and x.shape == y.shape == (4, 96)
    assert not np.array_equal(x, data.train_batch(4, 96, seed=0, stage=1, step=6)[0])
    assert (y[x == PAD] == -100).all()  # never trained on padding
    for row in range(4):  # only continuation tokens (and the eos) count
        scored = y[row][y[row] != -100]
        assert scored[-1] == EOS or len(scored) == 96
        text = byte_tok.decode(scored)
        assert text.strip() and text in "".join(byte_tok.decode(t) + "" for t in data.train_targets)
    batches = data.eval_batches(4, 96, 3)
    assert len(batches) == 3 and all(np.array_equal(a[0], b[0]) for a, b in zip(batches, data.eval_batches(4, 96, 3)))
    seq = G.load_generation_task("code", TaskSpec(source="builtin:docstring-code"), byte_tok, cache_dir, "seq2seq")
    (enc, dec), target = seq.train_batch(4, 96, seed=0, stage=1, step=5)
    assert enc.shape == dec.shape == target.shape == (4, 96)
    assert (dec[:, 0] == seq.decoder_start_id).all()
    kept = target[:, 1:] != -100  # decoder input j + 1 is target j, but for the last (eos)
    assert np.array_equal(dec[:, 1:][kept], target[:, :-1][kept])


# ---------------------------------------------------------------------------------------------
# forward and loss


def test_batch_helpers():
    batch = ((np.arange(6).reshape(3, 2), np.ones((3, 4), dtype=np.int64)), np.zeros((3, 4), dtype=np.int64))
    moved = batch_to(batch, "cpu")
    assert isinstance(moved[0][0], torch.Tensor) and moved[0][0].dtype == torch.int64
    assert [t.shape[0] for t in (*slice_batch(moved, 2)[0], slice_batch(moved, 2)[1])] == [2, 2, 2]
    assert slice_batch(batch, 1)[0][0].tolist() == [[0, 1]]


def test_loss_ignores_masked_targets():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[-100, 3, 4, -100, -100], [1, -100, 2, 6, -100]])
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss_of(logits, targets), expected)


def test_causal_loss_is_continuation_only(tiny_neo, causal_data):
    inputs, targets = batch_to(causal_data.eval_batches(3, 80, 1)[0], "cpu")
    with torch.no_grad():
        loss = loss_of(forward_logits(tiny_neo, inputs), targets)
        # by hand: each pair alone, unpadded, cross-entropy of its continuation tokens
        total, count = 0.0, 0
        for row in range(3):
            n = int((inputs[row] != PAD).sum())
            logp = torch.log_softmax(tiny_neo(input_ids=inputs[row:row + 1, :n]).logits[0].float(), -1)
            for position in range(n):
                if targets[row, position] != -100:
                    total -= float(logp[position, targets[row, position]])
                    count += 1
    assert count == int((targets != -100).sum())
    assert abs(float(loss) - total / count) < 1e-4


def test_seq2seq_forward_masks_encoder_padding(tiny_t5):
    (enc, dec), _ = G.seq2seq_batch([np.array([10, 11, 12]), np.arange(40, 50)], [np.array([20, 21]), np.array([30])],
                                    12, PAD, EOS, decoder_start_id=tiny_t5.config.decoder_start_token_id)
    enc, dec = batch_to((enc, dec), "cpu")
    with torch.no_grad():
        batched = forward_logits(tiny_t5, (enc, dec))
        alone = forward_logits(tiny_t5, (enc[:1, :3], dec[:1, :3]))
    assert batched.shape == (2, 12, tiny_t5.config.vocab_size)
    assert torch.allclose(batched[0, :3], alone[0], atol=1e-5)
    assert forward_logits(tiny_t5, enc).shape == (2, 12, tiny_t5.config.vocab_size)  # a tensor: as before


# ---------------------------------------------------------------------------------------------
# scoring


def test_exact_match_and_bleu_on_strings():
    refs = ["    return self._data[key]\n", "    x = compute(a, b)\n    return x + 1\n"]
    assert G.exact_match(refs, refs) == 1.0
    assert G.bleu4(refs, refs) == pytest.approx(100.0)
    assert G.exact_match(["    return self._data[key]   \n\n", "x"], refs) == 0.5  # trailing space/lines
    assert G.exact_match(["return self._data[key]\n", refs[1]], refs) == 0.5  # indentation is code
    partial = G.bleu4(["    return self._data[other]\n", "    y = compute(a, b)\n    return y\n"], refs)
    assert 0.0 < partial < 100.0
    assert G.bleu4(["", ""], refs) == 0.0 and G.exact_match([], []) == 0.0


class CopyingModel(torch.nn.Module):
    """A causal 'model' that knows each row's reference: its logits pick the next token of
    ``prompt + continuation + eos`` given the real (unmasked) tokens of the row."""

    def __init__(self, sequences: list[list[int]]):
        super().__init__()
        self.config = SimpleNamespace(model_type="gpt_neo", max_position_embeddings=512)
        self.sequences = sequences

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        logits = torch.zeros(*input_ids.shape, ByteTokenizer.vocab_size)
        for row, sequence in enumerate(self.sequences):
            real = input_ids[row][attention_mask[row] == 1].tolist()
            assert real == sequence[:len(real)]  # left padding never reorders a row
            logits[row, -1, sequence[len(real)] if len(real) < len(sequence) else EOS] = 1.0
        return SimpleNamespace(logits=logits)


def test_score_is_perfect_when_the_model_copies_the_reference(causal_data):
    n = 5
    sequences = [[*map(int, p), *map(int, t), EOS] for p, t in zip(causal_data.eval_prompts[:n],
                                                                     causal_data.eval_targets[:n])]
    score = G.score_generation(CopyingModel(sequences), ByteTokenizer(), causal_data, "cpu", examples=n,
                               max_new_tokens=G.MAX_CONTINUATION_BYTES + 1)
    assert score == {"exact_match": 1.0, "bleu": pytest.approx(100.0), "examples": n}


def test_batched_decoding_equals_one_by_one(tiny_neo, causal_data):
    prompts = causal_data.eval_prompts[:3]
    for seq_len in (None, 48):
        batched = G.greedy_decode(tiny_neo, prompts, "cpu", 6, PAD, EOS, seq_len)
        alone = [G.greedy_decode(tiny_neo, [p], "cpu", 6, PAD, EOS, seq_len)[0] for p in prompts]
        assert all(np.array_equal(a, b) for a, b in zip(batched, alone))


def test_score_runs_on_tiny_models(tiny_neo, tiny_t5, causal_data, byte_tok, cache_dir):
    tiny_neo.train()
    score = G.score_generation(tiny_neo, byte_tok, causal_data, "cpu", examples=3, max_new_tokens=8, seq_len=64)
    assert score["examples"] == 3 and 0 <= score["exact_match"] <= 1 and 0 <= score["bleu"] <= 100
    assert tiny_neo.training  # mode restored
    tiny_neo.eval()
    seq = G.load_generation_task("code", TaskSpec(source="builtin:docstring-code"), byte_tok, cache_dir, "seq2seq",
                                 decoder_start_id=tiny_t5.config.decoder_start_token_id)
    score = G.score_generation(tiny_t5, byte_tok, seq, "cpu", examples=3, max_new_tokens=8, seq_len=64)
    assert score["examples"] == 3 and 0 <= score["bleu"] <= 100
    # a training step on the seq2seq batch works end to end
    inputs, targets = batch_to(seq.train_batch(2, 48, seed=0, stage=0, step=0), "cpu")
    loss = loss_of(forward_logits(tiny_t5, inputs), targets)
    loss.backward()
    assert torch.isfinite(loss) and tiny_t5.lm_head.weight.grad is not None
    tiny_t5.zero_grad()


# ---------------------------------------------------------------------------------------------
# datasets sources and errors


def _dataset(tmp_path, rows):
    directory = tmp_path / "ds"
    directory.mkdir()
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_dataset_pairs_and_column_errors(tmp_path, byte_tok):
    rows = [{"doc": f"Add {i}.", "code": f"def f(x):\n    return x + {i}\n"} for i in range(30)]
    source = str(_dataset(tmp_path, rows + [{"doc": "", "code": "x"}]))
    spec = TaskSpec(source=source, kind="generation", prompt_column="doc", target_column="code")
    data = G.load_generation_task("docs", spec, byte_tok, tmp_path / "cache", "causal_lm")
    assert data.train_docs + data.eval_docs == 30 and data.eval_docs >= 1
    assert data.eval_target_texts[0].startswith("def f(x):")

    with pytest.raises(DataError) as info:
        G.load_generation_task("docs", spec.model_copy(update={"prompt_column": "nope"}), byte_tok, None, "causal_lm")
    assert info.value.field == "tasks.docs.prompt_column"
    assert "'nope'" in str(info.value) and "tasks.docs.prompt_column to one of: doc, code" in str(info.value)

    with pytest.raises(DataError) as info:
        G.list_pairs(spec.model_copy(update={"target_column": None}), "tasks.docs")
    assert info.value.field == "tasks.docs.target_column" and "func_code_string" in str(info.value)

    with pytest.raises(DataError) as info:
        G.list_pairs(TaskSpec(source="builtin:pydoc", kind="generation"), "tasks.p")
    assert info.value.field == "tasks.p.source"
