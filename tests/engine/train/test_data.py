"""engine.train.data: tokenizers, documents, the held-out split, the stream cache and batches.
Offline and fast: datasets are local files written to tmp_path, never downloads."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from engine.plan import TaskSpec
from engine.train import data as D

TEXT = "Héllo, wörld ☃ — 𝄞 naïve\nsecond line\n"


@pytest.fixture(scope="module")
def byte_tok():
    return D.ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer_round_trip(byte_tok):
    ids = byte_tok.encode(TEXT)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.min() >= 3 and ids.max() < byte_tok.vocab_size
    assert len(ids) == len(TEXT.encode("utf-8"))
    assert byte_tok.decode(ids) == TEXT
    # specials are skipped; a cut inside a character decodes with a replacement, not an error
    assert byte_tok.decode([byte_tok.pad_id, *ids[:3], byte_tok.eos_id]) == TEXT[:2]
    assert "\ufffd" in byte_tok.decode(byte_tok.encode("☃")[:2])
    assert (byte_tok.vocab_size, byte_tok.pad_id, byte_tok.eos_id) == (259, 0, 1)


def test_byte_tokenizer_matches_byt5(byte_tok, tmp_path):
    from transformers import AutoTokenizer, ByT5Tokenizer

    reference = ByT5Tokenizer(extra_ids=0)(TEXT)["input_ids"]
    assert reference[-1] == byte_tok.eos_id
    assert reference[:-1] == byte_tok.encode(TEXT).tolist()
    byte_tok.save(tmp_path)  # an exported model directory loads it with AutoTokenizer
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(TEXT)["input_ids"][:-1] == byte_tok.encode(TEXT).tolist()
    assert len(loaded) == byte_tok.vocab_size


def _tiny_hf_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the cat sat on the mat"] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(directory)


def test_hf_tokenizer_from_local_dir(tmp_path):
    _tiny_hf_tokenizer(tmp_path)
    tok = D.load_tokenizer(str(tmp_path))
    assert isinstance(tok, D.HFTokenizer)
    assert (tok.eos_id, tok.pad_id) == (1, 0) and tok.vocab_size >= 259
    ids = tok.encode("the cat ☃")
    assert ids.dtype == np.int32 and tok.eos_id not in ids.tolist()  # no special tokens added
    assert tok.decode(ids) == "the cat ☃"
    assert tok.name.startswith("hf:") and tok.name != D.ByteTokenizer.name
    stream = D._stream([("a", "the cat"), ("b", "sat")], tok)[0]
    assert (stream == tok.eos_id).sum() == 2 and stream[-1] == tok.eos_id


def test_load_tokenizer_errors(tmp_path):
    assert isinstance(D.load_tokenizer("bytes"), D.ByteTokenizer)
    for spec, reason in [(str(tmp_path / "missing"), "no such directory"),
                         (str(tmp_path), "no tokenizer files")]:
        with pytest.raises(D.DataError) as info:
            D.load_tokenizer(spec)
        assert info.value.field == "model.tokenizer"
        message = str(info.value)
        assert reason in message and '"bytes"' in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# documents and the split


def test_pydoc_split_deterministic_and_disjoint(byte_tok):
    spec = TaskSpec(source="builtin:pydoc")
    docs = D.list_documents(spec, "tasks.prose")
    assert len(docs) > 50 and docs == sorted(docs)
    train, evals = D.split_documents(docs, spec.eval_fraction)
    assert train and evals
    assert not {d for d, _ in train} & {d for d, _ in evals}
    assert len(train) + len(evals) == len(docs)
    assert (train, evals) == D.split_documents(list(docs), spec.eval_fraction)

    data = D.load_task("prose", spec, byte_tok, cache_dir=None)
    again = D.load_task("prose", spec, byte_tok, cache_dir=None)
    assert np.array_equal(data.train, again.train) and np.array_equal(data.eval, again.eval)
    assert (data.train_docs, data.eval_docs) == (len(train), len(evals))
    assert data.train.dtype == np.int32 and (data.train == byte_tok.eos_id).sum() == len(train)
    assert data.eval_tokens == len(data.eval) == data.eval_bytes + len(evals)  # bytes + one eos each
    train_text = byte_tok.decode(data.train)
    assert all(text not in train_text for _, text in evals)  # eval text never trains


def test_split_guarantees_both_sides():
    docs = [(f"doc{i}", f"text {i}") for i in range(5)]
    train, evals = D.split_documents(docs, 0.0001)  # the hash holds out none of these
    assert len(evals) == 1 and len(train) == 4
    train, evals = D.split_documents(docs[:2], 0.89)
    assert len(train) >= 1 and len(evals) >= 1
    train, evals = D.split_documents([("only", "first line\nsecond line\n")], 0.1)
    assert train[0][1] + evals[0][1] == "first line\nsecond line\n"
    assert train[0][1].strip() and evals[0][1].strip()


def test_tiny_text_file_gives_both_streams(byte_tok, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("ab")
    data = D.load_task("t", TaskSpec(source=str(path)), byte_tok, tmp_path / "cache")
    assert len(data.train) >= 2 and data.eval_tokens >= 2
    assert (data.train_docs, data.eval_docs) == (1, 1)


def test_unknown_builtin():
    with pytest.raises(D.DataError) as info:
        D.list_documents(TaskSpec(source="builtin:nope"), "tasks.t")
    assert info.value.field == "tasks.t.source"
    assert "builtin:pydoc" in str(info.value) and "builtin:stdlib-python" in str(info.value)


def test_missing_local_path(tmp_path):
    with pytest.raises(D.DataError) as info:
        D.list_documents(TaskSpec(source=str(tmp_path / "nope")), "tasks.t")
    assert info.value.field == "tasks.t.source" and "no such file or directory" in str(info.value)


def test_stdlib_python(byte_tok, tmp_path):
    docs = D.list_documents(TaskSpec(source="builtin:stdlib-python"), "tasks.code")
    assert len(docs) > 100 and [d for d, _ in docs] == sorted(d for d, _ in docs)
    assert sum("def " in text for _, text in docs) > 50
    assert sum(len(t.encode()) for _, t in docs) <= D.STDLIB_MAX_TOTAL_BYTES * 1.01
    for doc_id, _ in docs:
        parts = doc_id.split("/")
        assert doc_id.endswith(".py") and not set(parts[:-1]) & D.STDLIB_EXCLUDED_DIRS
    start = time.perf_counter()
    data = D.load_task("code", TaskSpec(source="builtin:stdlib-python"), byte_tok, tmp_path)
    assert time.perf_counter() - start < 10
    assert data.train_docs + data.eval_docs == len(docs) and data.eval_docs > 0


def test_local_text_file_paragraph_documents(tmp_path):
    paragraphs = [f"Paragraph {i}. " + "word " * 100 for i in range(30)]  # ~500 chars each
    path = tmp_path / "book.md"
    path.write_text("\n\n".join(paragraphs) + "\n")
    docs = D.list_documents(TaskSpec(source=str(path)), "tasks.t")
    assert len(docs) == 8 and docs[0][0] == "book.md#0"
    assert all(len(text) >= D.MIN_DOC_CHARS for _, text in docs[:-1])
    assert "\n\n".join(text for _, text in docs) == "\n\n".join(paragraphs)


def test_local_text_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.py").write_text("def f(): pass\n")
    (tmp_path / "a.rst").write_text("ay")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    docs = D.list_documents(TaskSpec(source=str(tmp_path)), "tasks.t")
    assert docs == [("a.rst", "ay"), ("b.txt", "bee"), ("sub/a.py", "def f(): pass\n")]
    assert D.list_documents(TaskSpec(source=str(tmp_path), max_docs=2), "tasks.t") == docs[:2]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_local_jsonl_via_datasets(byte_tok, tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    rows = [{"text": f"story number {i}", "label": i} for i in range(20)] + [{"text": "", "label": 0}]
    _write_jsonl(ds / "train.jsonl", rows)
    (ds / "README.md").write_text("# a dataset card beside the data stays a dataset dir\n")
    cache = tmp_path / "cache"

    spec = TaskSpec(source=str(ds))
    docs = D.list_documents(spec, "tasks.s", cache)
    assert docs == [(f"row{i}", f"story number {i}") for i in range(20)]
    assert D.list_documents(TaskSpec(source=str(ds), max_docs=3), "tasks.s", cache) == docs[:3]
    # a single data file goes through its format's builder: same rows
    assert D.list_documents(TaskSpec(source=str(ds / "train.jsonl")), "tasks.s", cache) == docs

    data = D.load_task("s", spec, byte_tok, cache)
    assert data.train_docs + data.eval_docs == 20 and data.eval_docs >= 1

    with pytest.raises(D.DataError) as info:
        D.list_documents(TaskSpec(source=str(ds), column="body"), "tasks.s", cache)
    assert info.value.field == "tasks.s.column"
    assert "'body'" in str(info.value) and "available columns: text, label" in str(info.value)

    with pytest.raises(D.DataError) as info:
        D.list_documents(TaskSpec(source=str(ds), split="validation"), "tasks.s", cache)
    assert info.value.field == "tasks.s.split"


def test_hub_failure_message():
    spec = TaskSpec(source="someone/some-dataset")
    error = D._dataset_error(spec, "tasks.s", ConnectionError("Couldn't reach 'x' on the Hub\nmore"), False)
    assert error.field == "tasks.s.source"
    assert str(error) == ("cannot load dataset 'someone/some-dataset': Couldn't reach 'x' on the Hub"
                          " — hub datasets need the network; use a local directory or builtin:pydoc")


# ---------------------------------------------------------------------------------------------
# the cache


def test_cache_round_trip(byte_tok, tmp_path):
    spec = TaskSpec(source="builtin:pydoc")
    built = D.load_task("prose", spec, byte_tok, tmp_path)
    assert not built.from_cache
    (entry,) = (tmp_path / "corpora").iterdir()  # no temporary directories left behind
    assert {p.name for p in entry.iterdir()} == {"train.npy", "eval.npy", "meta.json"}

    start = time.perf_counter()
    cached = D.load_task("prose", spec, byte_tok, tmp_path)
    assert time.perf_counter() - start < 0.5
    assert cached.from_cache and cached.name == "prose"
    assert np.array_equal(built.train, cached.train) and np.array_equal(built.eval, cached.eval)
    assert cached.train.dtype == cached.eval.dtype == np.int32
    for key in D._META_KEYS:
        assert getattr(built, key) == getattr(cached, key)

    D.load_task("prose", TaskSpec(source="builtin:pydoc", eval_fraction=0.2), byte_tok, tmp_path)
    assert len(list((tmp_path / "corpora").iterdir())) == 2  # the spec is part of the key


def test_cache_race_loser_keeps_winner(byte_tok, tmp_path):
    spec = TaskSpec(source="builtin:pydoc")
    winner = D.load_task("prose", spec, byte_tok, tmp_path)
    (entry,) = (tmp_path / "corpora").iterdir()
    D._write_cache(tmp_path / "corpora", entry, winner)  # a second writer, finishing later
    assert sorted(p.name for p in (tmp_path / "corpora").iterdir()) == [entry.name]
    assert np.array_equal(D.load_task("prose", spec, byte_tok, tmp_path).train, winner.train)


def test_cache_notices_edited_local_files(byte_tok, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first version of a")
    (src / "b.txt").write_text("bbb")
    spec = TaskSpec(source=str(src))
    before = D.load_task("t", spec, byte_tok, tmp_path / "cache")
    (src / "a.txt").write_text("second, longer version of a")
    after = D.load_task("t", spec, byte_tok, tmp_path / "cache")
    assert not after.from_cache and len(after.train) + len(after.eval) > len(before.train) + len(before.eval)


# ---------------------------------------------------------------------------------------------
# batches


def test_train_batch_deterministic_and_shifted():
    stream = np.arange(1000, dtype=np.int32)
    x, y = D.train_batch(stream, 4, 16, seed=0, stage=1, step=5)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert np.array_equal(y, x + 1)  # contiguous windows of the stream
    x2, y2 = D.train_batch(stream, 4, 16, seed=0, stage=1, step=5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    for other in [dict(seed=0, stage=1, step=6), dict(seed=0, stage=2, step=5), dict(seed=1, stage=1, step=5)]:
        assert not np.array_equal(x, D.train_batch(stream, 4, 16, **other)[0])
    assert x.max() < 1000


def test_train_batch_short_stream_is_tiled():
    x, y = D.train_batch(np.array([5, 6, 7], dtype=np.int32), 2, 8, seed=0, stage=0, step=0)
    assert x.tolist() == [[5, 6, 7, 5, 6, 7, 5, 6]] * 2
    assert y.tolist() == [[6, 7, 5, 6, 7, 5, 6, 7]] * 2
    x, _ = D.train_batch(np.arange(9, dtype=np.int32), 3, 8, seed=0, stage=0, step=0)
    assert x.tolist() == [list(range(8))] * 3  # exactly T+1 tokens: one possible window


def test_eval_batches_fixed_and_spread():
    stream = np.arange(10_000, dtype=np.int32)
    batches = D.eval_batches(stream, 4, 32, 3)
    assert len(batches) == 3 and all(x.shape == (4, 32) for x, _ in batches)
    again = D.eval_batches(stream, 4, 32, 3)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(batches, again))
    starts = np.concatenate([x[:, 0] for x, _ in batches])
    assert starts[0] == 0 and starts[-1] == 10_000 - 33  # spread over the whole stream
    assert np.all(np.diff(starts) >= 33)  # non-overlapping
    assert all(np.array_equal(y, x + 1) for x, y in batches)
    short = D.eval_batches(np.arange(5, dtype=np.int32), 2, 8, 2)  # tiled, still fixed shapes
    assert [x.shape for x, _ in short] == [(2, 8), (2, 8)]


def test_bits_per_byte():
    assert D.bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    assert D.bits_per_byte(2.0, 100, 400) == pytest.approx(2.0 * 100 / (400 * math.log(2)))
    assert math.isnan(D.bits_per_byte(1.0, 10, 0))
