"""Generation tasks: prompt -> continuation pairs (docstring -> code), trained with the loss on
the continuation only, scored by exact match and BLEU-4 on greedily decoded held-out prompts.

Headless and numpy-only at import (torch, datasets and sacrebleu are imported inside the
functions that need them), like engine.train.data, whose helpers (the standard-library walk, the
hash split, dataset loading, the atomic cache) this module reuses.

The pipeline for one generation task of a plan::

    list_pairs(spec)                 -> [Pair(group, pair_id, prompt, continuation)]
    split by a hash of the group     -> train / eval: a module (builtin) or a row (datasets)
                                        never lands on both sides
    tokenizer.encode                 -> token arrays, cached under cache_dir/generation/<key>/
    GenerationData.train_batch(...)  -> stateless batches, loss masked to the continuation

Batches, by model kind:

- causal_lm  ``prompt + continuation + eos`` in one row; inputs [B, T] and targets [B, T]
             (next token), -100 wherever the token to predict is in the prompt or is padding.
- seq2seq    ``(encoder_ids [B, Te], decoder_input_ids [B, Td])`` and targets [B, Td]: the
             encoder reads the prompt, the decoder is teacher-forced on ``continuation + eos``
             shifted right behind the decoder start token; padded targets are -100.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.builtins import GENERATION_CORPORA
from engine.train.data import (
    DATA_SUFFIXES,
    DataError,
    _hash_int,
    _load_dataset,
    _local_fingerprint,
    _stdlib_documents,
    split_documents,
    write_dir_atomic,
)
from engine.train.data import FORMAT_VERSION as DATA_FORMAT_VERSION

# Bump when the way pairs, splits or token arrays are built changes: it invalidates every cache.
FORMAT_VERSION = "1"

IGNORE_INDEX = -100  # torch cross_entropy's ignore_index: prompt and padding targets
MODEL_KINDS = ("causal_lm", "seq2seq")
BUILTIN_GENERATION_CORPORA = GENERATION_CORPORA

# A pair (prompt + continuation, in UTF-8 bytes = byte tokens) fits a 384-token context, and
# the continuation is at most 256 bytes, so that a decode budget of a few hundred tokens can
# reproduce it. Longer functions are skipped, not cut: a cut body is not a function body.
MAX_PAIR_BYTES = 384
MAX_CONTINUATION_BYTES = 256

# TaskSpec fields that change how a task is scored, not its pairs: left out of the cache key.
_SCORING_FIELDS = {"generate_examples", "max_new_tokens"}


@dataclass(frozen=True)
class Pair:
    """One example: `group` decides the held-out split (a module path, a dataset row)."""

    group: str
    pair_id: str
    prompt: str
    continuation: str


# ---------------------------------------------------------------------------------------------
# pairs: builtin:docstring-code


def docstring_code_pairs() -> list[Pair]:
    """Functions and methods with a docstring in the running Python's standard library (every
    file engine.train.data's walk keeps, uncapped): prompt = the ``def`` line(s) and the docstring as
    they appear in the source, continuation = the rest of the body. Both are dedented by the
    ``def``'s own indentation, so ``prompt + continuation`` is the function's source.

    Modules come in the order of a hash of their path (so ``max_docs`` takes an unbiased sample
    of modules), functions in source order within a module.
    """
    pairs = []
    for module, source in sorted(_stdlib_documents(max_total_bytes=None), key=lambda d: _hash_int(d[0])):
        pairs.extend(_module_pairs(module, source))
    return pairs


def _module_pairs(module: str, source: str) -> list[Pair]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a file of the stdlib written for another Python version
        return []
    lines = source.splitlines(keepends=True)
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    pairs = []
    for node in sorted(functions, key=lambda n: n.lineno):
        split = _split_function(node, lines)
        if split is not None:
            prompt, continuation = split
            pairs.append(Pair(module, f"{module}:{node.lineno}:{node.name}", prompt, continuation))
    return pairs


def _split_function(node, lines: list[str]) -> tuple[str, str] | None:
    """(signature + docstring, body after the docstring), or None when the function does not
    make a useful pair: no docstring, a trivial or one-line body, too long, or lines that do
    not share the ``def``'s indentation (a string literal's text), which a dedent would change."""
    if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
        return None
    docstring, first = node.body[0], node.body[1]
    if first.lineno <= docstring.end_lineno or _is_trivial(node.body[1:]):
        return None  # body on the docstring's line (``"doc"; return x``), or a stub body
    def_line = lines[node.lineno - 1]
    indent = def_line[: len(def_line) - len(def_line.lstrip())]
    head = _dedent(lines[node.lineno - 1: docstring.end_lineno], indent)
    body = _dedent(lines[docstring.end_lineno: node.end_lineno], indent)
    if head is None or body is None:
        return None
    body = body.rstrip() + "\n"
    size = len(head.encode("utf-8")) + len(body.encode("utf-8"))
    if size > MAX_PAIR_BYTES or len(body.encode("utf-8")) > MAX_CONTINUATION_BYTES:
        return None
    return head, body


def _is_trivial(statements: list) -> bool:
    """``pass``, ``...`` and ``raise NotImplementedError``: nothing to learn from the docstring."""
    def trivial(statement) -> bool:
        if isinstance(statement, ast.Pass):
            return True
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            return statement.value.value is Ellipsis
        if isinstance(statement, ast.Raise) and statement.exc is not None:
            exc = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
            return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
        return False

    return all(trivial(s) for s in statements)


def _dedent(lines: list[str], indent: str) -> str | None:
    """The lines without `indent`; blank lines become empty; None if a non-blank line lacks it."""
    out = []
    for line in lines:
        if not line.strip():
            out.append("\n")
        elif line.startswith(indent):
            out.append(line[len(indent):])
        else:
            return None
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# pairs: datasets (CodeSearchNet-like) and the dispatch


def list_pairs(spec, field: str, cache_dir: Path | None = None) -> list[Pair]:
    """The task's pairs in a deterministic order, the first ``spec.max_docs`` kept.

    `field` is the task's plan path (``"tasks.code"``), which errors extend; `cache_dir` holds
    the ``datasets`` Arrow cache (None: the datasets default).
    """
    source = spec.source
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_GENERATION_CORPORA:
            raise DataError(f"{field}.source", f"built-in corpus '{source}' has no prompt/continuation "
                            "pairs — generation tasks use builtin:docstring-code or a dataset with "
                            "prompt_column and target_column (or set kind = \"text\")")
        pairs = docstring_code_pairs()
    else:
        pairs = _dataset_pairs(spec, field, cache_dir)
    if spec.max_docs is not None:
        pairs = pairs[: spec.max_docs]
    if not pairs:
        raise DataError(f"{field}.source", f"'{source}' has no non-empty prompt/continuation pairs — "
                        "check prompt_column and target_column")
    return pairs


def _dataset_pairs(spec, field: str, cache_dir: Path | None) -> list[Pair]:
    """Rows of a ``datasets`` source (hub name, local directory or data file: engine.train.data's
    loader) with a non-empty prompt and target; each row is its own group."""
    _require_columns_named(spec, field)
    path = Path(spec.source).expanduser()
    if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(f"{field}.source", f"'{spec.source}' is a text file; a generation task needs "
                        "a dataset (.jsonl/.json/.csv/.parquet) with prompt and target columns")
    dataset = _load_dataset(spec, field, cache_dir)
    columns = {"prompt_column": spec.prompt_column, "target_column": spec.target_column}
    for key, column in columns.items():
        if column not in dataset.column_names:
            raise DataError(f"{field}.{key}", f"no column '{column}' in '{spec.source}' — set "
                            f"{field}.{key} to one of: {', '.join(dataset.column_names)}")
    pairs, index = [], 0
    for chunk in dataset.select_columns(list(columns.values())).iter(batch_size=1000):
        for prompt, target in zip(chunk[spec.prompt_column], chunk[spec.target_column]):
            for key, value in (("prompt_column", prompt), ("target_column", target)):
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{field}.{key}", f"column '{columns[key]}' holds "
                                    f"{type(value).__name__} values, not text — name a text column")
            if prompt and prompt.strip() and target and target.strip():
                pairs.append(Pair(f"row{index}", f"row{index}", prompt, target))
            index += 1
        if spec.max_docs is not None and len(pairs) >= spec.max_docs:
            break
    return pairs


def _require_columns_named(spec, field: str) -> None:
    for key in ("prompt_column", "target_column"):
        if getattr(spec, key) is None:
            raise DataError(f"{field}.{key}", f"a generation task from a dataset needs {key} — e.g. "
                            "prompt_column = \"func_documentation_string\", target_column = "
                            "\"func_code_string\" for CodeSearchNet")


# ---------------------------------------------------------------------------------------------
# held-out split


def split_pairs(pairs: list[Pair], eval_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, eval), both non-empty, each in the pairs' order. Whole groups are held out by a
    hash of the group (engine.train.data's split, so a module's functions all land on one side);
    with a single group the pairs themselves are split by the hash of their ids."""
    groups = list(dict.fromkeys(p.group for p in pairs))
    if len(groups) >= 2:
        _, held_groups = split_documents([(g, g) for g in groups], eval_fraction)
        held = {g for g, _ in held_groups}
        return [p for p in pairs if p.group not in held], [p for p in pairs if p.group in held]
    if len(pairs) < 2:
        raise DataError("source", "a generation task needs at least two pairs — add more or raise max_docs")
    _, held_ids = split_documents([(p.pair_id, p.pair_id) for p in pairs], eval_fraction)
    held = {i for i, _ in held_ids}
    return [p for p in pairs if p.pair_id not in held], [p for p in pairs if p.pair_id in held]


# ---------------------------------------------------------------------------------------------
# the task data, its batches and its cache


@dataclass
class GenerationData:
    """A generation task's tokenized pairs (continuations without eos: batches append it) and
    the sizes the trainer reports, as engine.train.data.TaskData: ``eval_bytes`` (UTF-8 bytes of the
    held-out continuations) and ``eval_tokens`` (their tokens, one eos each) turn eval loss into
    bits per byte. ``eval_prompt_texts`` / ``eval_target_texts`` are the references scored."""

    name: str
    model_kind: str
    pad_id: int
    eos_id: int
    decoder_start_id: int
    train_prompts: list[np.ndarray]
    train_targets: list[np.ndarray]
    eval_prompts: list[np.ndarray]
    eval_targets: list[np.ndarray]
    eval_prompt_texts: list[str]
    eval_target_texts: list[str]
    train_docs: int
    eval_docs: int
    train_bytes: int
    eval_bytes: int
    eval_tokens: int
    from_cache: bool = False
    kind = "generation"  # (a class attribute, not a field) tells it from engine.train.data.TaskData

    def train_batch(self, batch_size: int, seq_len: int, seed: int, stage: int, step: int):
        """B training pairs drawn with ``default_rng([seed, stage, step])`` -> (inputs, targets).
        Stateless, like engine.train.data.train_batch: a resumed run draws the same batches."""
        rows = np.random.default_rng([seed, stage, step]).integers(0, len(self.train_prompts), size=batch_size)
        return self._batch([self.train_prompts[i] for i in rows], [self.train_targets[i] for i in rows], seq_len)

    def eval_batches(self, batch_size: int, seq_len: int, n_batches: int) -> list:
        """n_batches fixed batches of held-out pairs spread evenly over them (the same every call;
        pairs repeat only when there are fewer than batch_size * n_batches)."""
        count = batch_size * n_batches
        rows = np.linspace(0, len(self.eval_prompts) - 1, count).round().astype(np.int64)
        return [self._batch([self.eval_prompts[i] for i in rows[s:s + batch_size]],
                            [self.eval_targets[i] for i in rows[s:s + batch_size]], seq_len)
                for s in range(0, count, batch_size)]

    def _batch(self, prompts: list[np.ndarray], targets: list[np.ndarray], seq_len: int):
        if self.model_kind == "seq2seq":
            return seq2seq_batch(prompts, targets, seq_len, self.pad_id, self.eos_id, self.decoder_start_id)
        return causal_batch(prompts, targets, seq_len, self.pad_id, self.eos_id)


def causal_batch(prompts: list[np.ndarray], continuations: list[np.ndarray], seq_len: int,
                 pad_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``prompt + continuation + eos`` cut to seq_len + 1 tokens -> (inputs, targets) [B, T],
    right-padded. The continuation is kept first (cut at its end only if it alone overflows,
    leaving one prompt token to predict from); the prompt is cut from the left to fill the rest.
    Targets are -100 where the next token is a prompt token or padding."""
    inputs = np.full((len(prompts), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(prompts), seq_len), IGNORE_INDEX, dtype=np.int64)
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        answer = np.append(continuation, eos_id)
        if len(prompt):
            answer = answer[:seq_len]  # room for at least one prompt token
            context = prompt[len(prompt) - min(len(prompt), seq_len + 1 - len(answer)):]
        else:
            answer, context = answer[: seq_len + 1], prompt
        tokens = np.concatenate([context, answer]).astype(np.int64)
        length = len(tokens) - 1
        inputs[row, :length] = tokens[:-1]
        # targets[i] is tokens[i + 1]: scored from the last prompt token on (without a prompt,
        # the first answer token has nothing to be predicted from)
        first = max(len(context) - 1, 0)
        targets[row, first:length] = tokens[first + 1:]
    return inputs, targets


def seq2seq_batch(prompts: list[np.ndarray], continuations: list[np.ndarray], seq_len: int,
                  pad_id: int, eos_id: int, decoder_start_id: int):
    """((encoder_ids [B, T], decoder_input_ids [B, T]), targets [B, T]), right-padded: the
    encoder reads the prompt (cut from the left), the decoder reads ``continuation + eos`` (cut
    at its end) shifted right behind decoder_start_id; padded targets are -100."""
    batch = len(prompts)
    encoder_ids = np.full((batch, seq_len), pad_id, dtype=np.int64)
    decoder_ids = np.full((batch, seq_len), pad_id, dtype=np.int64)
    targets = np.full((batch, seq_len), IGNORE_INDEX, dtype=np.int64)
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        context = prompt[-seq_len:]
        answer = np.append(continuation, eos_id)[:seq_len]
        encoder_ids[row, : len(context)] = context
        decoder_ids[row, 0] = decoder_start_id
        decoder_ids[row, 1: len(answer)] = answer[:-1]
        targets[row, : len(answer)] = answer
    return (encoder_ids, decoder_ids), targets


def load_generation_task(name: str, spec, tokenizer, cache_dir: Path | None, model_kind: str,
                         decoder_start_id: int | None = None) -> GenerationData:
    """Build (or load from ``cache_dir/generation/<key>/``) the tokenized pairs of task `name`.

    `model_kind` ("causal_lm" or "seq2seq") shapes the batches; `decoder_start_id` (seq2seq:
    the model's ``config.decoder_start_token_id``; default the tokenizer's pad id, as in T5)
    starts the shifted decoder inputs. The cache key covers the spec (less its scoring fields),
    the tokenizer, the Python version (the built-in corpus comes from the running Python), the
    format versions, and a local source's file names, sizes and mtimes. cache_dir=None: no cache.
    """
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"generation tasks need a causal_lm or seq2seq model, not '{model_kind}'")
    field = f"tasks.{name}"
    start = tokenizer.pad_id if decoder_start_id is None else int(decoder_start_id)
    context = dict(name=name, model_kind=model_kind, pad_id=int(tokenizer.pad_id),
                   eos_id=int(tokenizer.eos_id), decoder_start_id=start)
    if cache_dir is None:
        return GenerationData(**context, **_build_arrays(spec, tokenizer, field, None))
    final = Path(cache_dir) / "generation" / _cache_key(spec, tokenizer)
    cached = _read_cache(final)
    if cached is not None:
        return GenerationData(**context, **cached, from_cache=True)
    arrays = _build_arrays(spec, tokenizer, field, Path(cache_dir) / "datasets")
    _write_cache(final, arrays)
    return GenerationData(**context, **arrays)


def _build_arrays(spec, tokenizer, field: str, datasets_cache: Path | None) -> dict:
    """The tokenized split and its sizes: the fields of GenerationData that the cache holds."""
    pairs = list_pairs(spec, field, datasets_cache)
    try:
        train, evals = split_pairs(pairs, spec.eval_fraction)
    except DataError as e:
        raise DataError(f"{field}.source", e.message) from None
    eval_targets = _encode(tokenizer, [p.continuation for p in evals])
    return dict(
        train_prompts=_encode(tokenizer, [p.prompt for p in train]),
        train_targets=_encode(tokenizer, [p.continuation for p in train]),
        eval_prompts=_encode(tokenizer, [p.prompt for p in evals]),
        eval_targets=eval_targets,
        eval_prompt_texts=[p.prompt for p in evals],
        eval_target_texts=[p.continuation for p in evals],
        train_docs=len(train), eval_docs=len(evals),
        train_bytes=sum(len(p.prompt.encode("utf-8")) + len(p.continuation.encode("utf-8")) for p in train),
        eval_bytes=sum(len(p.continuation.encode("utf-8")) for p in evals),
        eval_tokens=sum(len(t) + 1 for t in eval_targets),
    )


def _encode(tokenizer, texts: list[str]) -> list[np.ndarray]:
    encoded = tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch") else \
        [tokenizer.encode(t) for t in texts]
    return [np.asarray(ids, dtype=np.int32) for ids in encoded]


def _cache_key(spec, tokenizer) -> str:
    parts = [spec.model_dump_json(exclude=_SCORING_FIELDS), tokenizer.name, sys.version,
             DATA_FORMAT_VERSION, FORMAT_VERSION, _local_fingerprint(spec.source)]
    return hashlib.sha1("\n".join(parts).encode("utf-8")).hexdigest()[:20]


_TOKEN_LISTS = ("train_prompts", "train_targets", "eval_prompts", "eval_targets")
_META_KEYS = ("train_docs", "eval_docs", "train_bytes", "eval_bytes", "eval_tokens")


def _write_cache(final: Path, arrays: dict) -> None:
    """Each token list as one flat array and its offsets (pairs.npz); the held-out texts (the
    references scored) and the sizes as JSON."""
    def fill(tmp: Path) -> None:
        flat = {}
        for key in _TOKEN_LISTS:
            flat[key], flat[f"{key}_offsets"] = _flatten(arrays[key])
        np.savez(tmp / "pairs.npz", **flat)
        texts = {k: arrays[k] for k in ("eval_prompt_texts", "eval_target_texts")}
        (tmp / "eval_texts.json").write_text(json.dumps(texts))
        (tmp / "meta.json").write_text(json.dumps({k: arrays[k] for k in _META_KEYS}, indent=1))

    write_dir_atomic(final, fill)


def _read_cache(directory: Path) -> dict | None:
    """The cached arrays, or None if absent or unreadable (then they are rebuilt)."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        texts = json.loads((directory / "eval_texts.json").read_text())
        with np.load(directory / "pairs.npz") as flat:
            lists = {key: _unflatten(flat[key], flat[f"{key}_offsets"]) for key in _TOKEN_LISTS}
    except (OSError, ValueError, KeyError):
        return None
    if any(meta.get(k) is None for k in _META_KEYS):
        return None
    return {**lists, **texts, **{k: meta[k] for k in _META_KEYS}}


def _flatten(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64)
    flat = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return flat, offsets


def _unflatten(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


# ---------------------------------------------------------------------------------------------
# scoring


def normalize_code(text: str) -> str:
    """Whitespace that does not change code: trailing spaces of each line, leading and trailing
    blank lines, and carriage returns. Indentation is kept (it is syntax)."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after normalize_code (0.0 when empty)."""
    if not references:
        return 0.0
    return sum(normalize_code(p) == normalize_code(r) for p, r in zip(predictions, references)) / len(references)


def bleu4(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (0-100) by sacrebleu with its "13a" tokenizer: it splits brackets,
    operators, dots and commas from identifiers (``self.f(x)`` -> ``self . f ( x )``), which is
    what code BLEU needs, and is sacrebleu's default, so scores compare with published ones.
    (The "intl" tokenizer splits on Unicode classes and "char" scores characters; neither fits
    code better.) Default exponential smoothing, one reference per prediction."""
    import sacrebleu

    if not references:
        return 0.0
    return float(sacrebleu.corpus_bleu([normalize_code(p) for p in predictions],
                                       [[normalize_code(r) for r in references]], tokenize="13a").score)


def score_generation(model, tokenizer, data: GenerationData, device, examples: int = 16,
                     max_new_tokens: int = 96, seq_len: int | None = None, batch_size: int = 16) -> dict:
    """Greedy-decode the first `examples` held-out prompts and score the continuations:
    ``{"exact_match": 0..1, "bleu": 0..100, "examples": n}``.

    `seq_len` is the training context: a causal model sees at most the last seq_len tokens of
    prompt + generated text (the windows it was trained on: learned position embeddings past
    them are untrained), and a seq2seq encoder the last seq_len prompt tokens. None: the
    model's maximum positions. The model is put in eval mode and restored.
    """
    predictions, references = decode_examples(model, tokenizer, data, device, examples, max_new_tokens,
                                              seq_len, batch_size)
    if not references:
        return {"exact_match": 0.0, "bleu": 0.0, "examples": 0}
    return {"exact_match": exact_match(predictions, references), "bleu": bleu4(predictions, references),
            "examples": len(references)}


def decode_examples(model, tokenizer, data: GenerationData, device, examples: int = 16,
                    max_new_tokens: int = 96, seq_len: int | None = None, batch_size: int = 16
                    ) -> tuple[list[str], list[str]]:
    """(predictions, references) for the first `examples` held-out prompts (score_generation's
    decoding, for showing examples)."""
    count = min(examples, len(data.eval_prompts))
    predictions = []
    for start in range(0, count, batch_size):
        prompts = data.eval_prompts[start:min(count, start + batch_size)]
        tokens = greedy_decode(model, prompts, device, max_new_tokens, tokenizer.pad_id,
                               tokenizer.eos_id, seq_len)
        predictions.extend(tokenizer.decode(t) for t in tokens)
    return predictions, list(data.eval_target_texts[:count])


def greedy_decode(model, prompts: list[np.ndarray], device, max_new_tokens: int, pad_id: int, eos_id: int,
                  seq_len: int | None = None) -> list[np.ndarray]:
    """Greedy continuations of a batch of prompts, each up to (not including) its eos.

    Written out rather than ``model.generate``: it recomputes every step without a key/value
    cache (grown models — inserted, virtual or mapped layers — need not keep a cache's layer
    count right), and it is the same for every family widen grows.
    """
    import torch

    from engine.model.forward import model_kind

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if model_kind(model) == "seq2seq":
                rows = _greedy_seq2seq(model, prompts, device, max_new_tokens, pad_id, eos_id, seq_len)
            else:
                rows = _greedy_causal(model, prompts, device, max_new_tokens, pad_id, eos_id, seq_len)
    finally:
        model.train(was_training)
    return [_until_eos(row, eos_id) for row in rows]


def _greedy_causal(model, prompts, device, max_new_tokens, pad_id, eos_id, seq_len):
    """Left-padded rows with an attention mask; positions count real tokens only, so a padded
    row computes what it would alone. Each step feeds the last `window` columns."""
    import torch

    window = seq_len or _max_positions(model)
    ids, mask = _left_padded(prompts, pad_id, device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    for _ in range(max_new_tokens):
        x, m = (ids, mask) if window is None else (ids[:, -window:], mask[:, -window:])
        positions = (m.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=x, attention_mask=m, position_ids=positions, use_cache=False).logits
        token = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), logits[:, -1].argmax(-1))
        generated.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)  # padding after a finished row: masked
        done |= token == eos_id
        if bool(done.all()):
            break
    return torch.stack(generated, 1).cpu().numpy()


def _greedy_seq2seq(model, prompts, device, max_new_tokens, pad_id, eos_id, seq_len):
    """Encode once (right-padded prompts, masked), then grow the decoder input step by step."""
    import torch

    cut = [p[-seq_len:] if seq_len else p for p in prompts]
    width = max(1, max(len(p) for p in cut))
    encoder_ids = torch.full((len(cut), width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(cut):
        encoder_ids[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
    mask = torch.zeros_like(encoder_ids)
    for row, prompt in enumerate(cut):
        mask[row, : max(1, len(prompt))] = 1
    encoder_ids, mask = encoder_ids.to(device), mask.to(device)
    encoded = model.get_encoder()(input_ids=encoder_ids, attention_mask=mask)
    start = model.config.decoder_start_token_id
    decoder = torch.full((len(cut), 1), pad_id if start is None else start, dtype=torch.long, device=device)
    done = torch.zeros(len(cut), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=decoder,
                       use_cache=False).logits
        token = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), logits[:, -1].argmax(-1))
        done |= token == eos_id
        decoder = torch.cat([decoder, token[:, None]], 1)
        if bool(done.all()):
            break
    return decoder[:, 1:].cpu().numpy()


def _left_padded(prompts, pad_id: int, device):
    import torch

    width = max(1, max(len(p) for p in prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _max_positions(model) -> int | None:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _until_eos(row: np.ndarray, eos_id: int) -> np.ndarray:
    stops = np.flatnonzero(row == eos_id)
    return row[: stops[0]] if len(stops) else row
