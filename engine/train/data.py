"""Task data: tokenizers, documents, the held-out split, the token-stream cache and batches.

Headless and numpy-only (transformers / datasets are imported lazily, inside the functions
that need them), so the CLI and the TUI can import this module cheaply.

The pipeline for one task of a plan::

    list_documents(spec)          -> [(doc_id, text)], in a deterministic order
    _split_documents(docs)        -> train / eval by a hash of doc_id (never by position)
    tokenizer.encode + eos        -> two int32 token streams
    cached under cache_dir/corpora/<key>/  (train.npy, eval.npy, meta.json)

Batches are drawn from the streams statelessly (``train_batch`` depends only on its arguments),
so a resumed run sees exactly the batches it would have seen.

Every problem with a plan's data fields is a ``DataError`` carrying the plan field path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.builtins import TEXT_CORPORA
from engine.errors import WidenError

# Bump when the way documents, splits or streams are built changes: it invalidates every cache.
FORMAT_VERSION = "1"

BUILTIN_CORPORA = TEXT_CORPORA
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Files that may sit beside data files in a dataset directory (a cloned hub dataset repo)
# without making it a directory of text documents.
DATASET_DIR_EXTRAS = {"readme.md", "readme", "license", "license.md", "license.txt"}

STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
STDLIB_MAX_FILE_BYTES = 200_000
# The whole stdlib is ~10 MB of .py; ~6 MB is plenty for a task and keeps a build in seconds.
STDLIB_MAX_TOTAL_BYTES = 6_000_000
# Paragraphs of a single text file are grouped into documents of at least this many characters.
MIN_DOC_CHARS = 2000


class DataError(WidenError, ValueError):
    """A problem with a task's data: ``field`` is the plan field that causes it
    (``tasks.prose.source``), ``str(error)`` the one-line message (as ``ModelLoadError``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------------------------
# tokenizers


class ByteTokenizer:
    """UTF-8 bytes in the ByT5 layout (pad=0, eos=1, unk=2, byte b -> b+3): no files, no
    download, and exported models load it with ``AutoTokenizer`` as a ``ByT5Tokenizer``."""

    name = "bytes"
    vocab_size = 259
    pad_id = 0
    eos_id = 1
    unk_id = 2
    offset = 3

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ids = ids[(ids >= self.offset) & (ids < self.vocab_size)]
        return (ids - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save(self, directory: Path | str) -> None:
        from transformers import ByT5Tokenizer

        ByT5Tokenizer(extra_ids=0).save_pretrained(str(directory))


class HFTokenizer:
    """A ``transformers`` tokenizer (hub name or local directory: one code path), encoding
    without special tokens: documents are delimited by ``eos_id`` here, not by the tokenizer."""

    def __init__(self, name_or_dir: str, gguf_file: str | None = None):
        from transformers import AutoTokenizer

        if gguf_file:  # the tokenizer stored in a GGUF (engine.model.gguf)
            from engine.model.gguf import GgufLocation, load_tokenizer

            location = GgufLocation(name_or_dir, gguf_file)
            self.hf = load_tokenizer(location)
            self.source = str(location)
            self.name = f"gguf:{location}:{_file_stamp(location.local_path)}"
        else:
            self.hf = AutoTokenizer.from_pretrained(name_or_dir)
            self.source = name_or_dir
            self.name = f"hf:{name_or_dir}:{_tokenizer_files_digest(name_or_dir)}"
        self.vocab_size = len(self.hf)
        eos, pad = self.hf.eos_token_id, self.hf.pad_token_id
        self.eos_id = eos if eos is not None else (pad if pad is not None else 0)
        self.pad_id = pad if pad is not None else self.eos_id

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # verbose=False: whole documents exceed model_max_length, which is fine for a stream.
        ids = self.hf(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=True)

    def save(self, directory: Path | str) -> None:
        self.hf.save_pretrained(str(directory))


def _tokenizer_files_digest(name_or_dir: str) -> str:
    """A digest of a local tokenizer's files, so that editing them invalidates cached streams
    (hub names: empty — the name is the identity)."""
    path = Path(name_or_dir).expanduser()
    if not path.is_dir():
        return ""
    digest = hashlib.sha1()
    for file in sorted(path.iterdir()):
        if file.is_file() and file.name.startswith(("tokenizer", "vocab", "merges", "special_tokens",
                                                    "added_tokens", "spiece")):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def _file_stamp(path: Path | None) -> str:
    """A local file's size and modification time, so that replacing it invalidates cached streams
    (hub files: empty — the name is the identity)."""
    if path is None:
        return ""
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def load_tokenizer(spec: str, model_spec=None):
    """``"bytes"`` -> ByteTokenizer; anything else -> HFTokenizer (hub name or directory; "gguf" or
    a .gguf path: the tokenizer stored in a GGUF, `model_spec` the plan's [model] for "gguf")."""
    if spec == "bytes":
        return ByteTokenizer()
    from engine.model.gguf import tokenizer_location

    location = tokenizer_location(spec, model_spec)
    if location is not None:
        return HFTokenizer(location.directory, gguf_file=location.file)
    try:
        return HFTokenizer(spec)
    except Exception as e:  # transformers raises OSError, ValueError, HF validation errors...
        raise DataError("model.tokenizer", f"cannot load tokenizer '{spec}': {_tokenizer_problem(spec, e)}"
                        " — use \"bytes\" or a local tokenizer directory; hub names need the network") from None


def _tokenizer_problem(spec: str, error: Exception) -> str:
    """Why a tokenizer did not load, in words that fit a local path (transformers' own message
    for a missing directory talks about repo ids)."""
    path = Path(spec).expanduser()
    if spec.startswith(("/", ".", "~")) and not path.exists():
        return "no such directory"
    if path.is_dir() and not any(path.glob("tokenizer*")) and not any(path.glob("vocab*")):
        return "no tokenizer files (tokenizer.json, tokenizer_config.json, vocab...) in it"
    return _short(error)


def _short(error: BaseException) -> str:
    """First line of an exception message, bounded, for one-line errors."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else error.__class__.__name__
    return text[:160].rstrip(" :")


# ---------------------------------------------------------------------------------------------
# documents


def list_documents(spec, field: str, cache_dir: Path | None = None) -> list[tuple[str, str]]:
    """The task's documents as ``(doc_id, text)``, in a deterministic order, empty ones dropped.

    `spec` is a plan's TaskSpec; `field` is the task's plan path (``"tasks.prose"``), which
    errors extend (``tasks.prose.source``). `cache_dir` holds the ``datasets`` Arrow cache
    (None: the datasets default). ``spec.max_docs`` keeps the first N documents.
    """
    source = spec.source
    if source.startswith("builtin:"):
        docs = _builtin_documents(source.removeprefix("builtin:"), field)
    else:
        path = Path(source).expanduser()
        if source.startswith(("/", ".", "~")) and not path.exists():
            raise DataError(f"{field}.source", f"no such file or directory '{source}' — give an "
                            "existing path, a datasets hub name or builtin:pydoc")
        if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
            docs = _text_file_documents(path)
        elif path.is_dir() and not _is_dataset_dir(path):
            docs = _text_dir_documents(path)
        else:
            docs = _dataset_documents(spec, field, cache_dir)
    docs = [(doc_id, text) for doc_id, text in docs if text.strip()]
    if spec.max_docs is not None:
        docs = docs[: spec.max_docs]
    if not docs:
        raise DataError(f"{field}.source", f"'{source}' has no non-empty documents — "
                        "point it at text files or a dataset with a text column")
    return docs


def _builtin_documents(name: str, field: str) -> list[tuple[str, str]]:
    if name == "pydoc":
        return _pydoc_documents()
    if name == "stdlib-python":
        return _stdlib_documents()
    raise DataError(f"{field}.source", f"unknown built-in corpus '{name}' — built-in corpora: "
                    f"{', '.join('builtin:' + n for n in BUILTIN_CORPORA)}")


def _pydoc_documents() -> list[tuple[str, str]]:
    """English prose: the Python reference topics shipped with every Python (``help()``)."""
    from pydoc_data.topics import topics

    return [(key, topics[key]) for key in sorted(topics)]


def _stdlib_documents(max_total_bytes: int | None = STDLIB_MAX_TOTAL_BYTES) -> list[tuple[str, str]]:
    """Python code: the running interpreter's standard library, one document per ``.py`` file.

    Tests, IDLE and installed packages are left out, and so are files over 200 kB (generated
    tables). The rest (~10 MB) is capped at `max_total_bytes` (None: no cap; the docstring->code
    pairs of engine.train.generation use every file): files are taken in the order of a hash of their
    relative path (a deterministic, unbiased sample across packages) while they fit under the
    cap, then sorted by path.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    sizes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        for filename in filenames:
            if filename.endswith(".py"):
                file = Path(dirpath, filename)
                size = file.stat().st_size
                if size <= STDLIB_MAX_FILE_BYTES:
                    sizes[file.relative_to(root).as_posix()] = size
    chosen, total = [], 0
    for rel in sorted(sizes, key=_hash_int):
        if max_total_bytes is None or total + sizes[rel] <= max_total_bytes:
            chosen.append(rel)
            total += sizes[rel]
    return [(rel, (root / rel).read_text(encoding="utf-8", errors="replace")) for rel in sorted(chosen)]


def _text_file_documents(path: Path) -> list[tuple[str, str]]:
    """One text file: its paragraphs (split on blank lines) grouped into documents of at least
    MIN_DOC_CHARS characters, so the held-out split has whole passages to choose from."""
    text = _read_text(path)
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    docs, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(len(p) for p in current) >= MIN_DOC_CHARS:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return [(f"{path.name}#{i}", doc) for i, doc in enumerate(docs)]


def _text_dir_documents(root: Path) -> list[tuple[str, str]]:
    """A directory of text files: one document per file (recursive, by relative path).
    Hidden files and binary files (with NUL bytes) are skipped."""
    docs = []
    for file in _visible_files(root):
        raw = file.read_bytes()
        if b"\0" not in raw:
            docs.append((file.relative_to(root).as_posix(), raw.decode("utf-8", errors="replace")))
    return docs


def _visible_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        files.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _is_dataset_dir(root: Path) -> bool:
    """Data files only (a README or LICENSE beside them allowed, as in a cloned hub dataset)."""
    files = _visible_files(root)
    data = [f for f in files if f.suffix.lower() in DATA_SUFFIXES]
    return bool(data) and all(f in data or f.name.lower() in DATASET_DIR_EXTRAS for f in files)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _dataset_documents(spec, field: str, cache_dir: Path | None) -> list[tuple[str, str]]:
    """Rows of a ``datasets`` source; doc_id is the row index (the dataset's own order).
    Read in chunks, stopping at max_docs non-empty rows: a large hub dataset's column is
    never materialised whole when only its start is used."""
    dataset = _load_dataset(spec, field, cache_dir)
    if spec.column not in dataset.column_names:
        raise DataError(f"{field}.column", f"no column '{spec.column}' in '{spec.source}' — "
                        f"available columns: {', '.join(dataset.column_names)}")
    docs, index = [], 0
    for chunk in dataset.select_columns([spec.column]).iter(batch_size=1000):
        for value in chunk[spec.column]:
            if isinstance(value, str) and value.strip():
                docs.append((f"row{index}", value))
            elif value is not None and not isinstance(value, str):
                raise DataError(f"{field}.column", f"column '{spec.column}' holds "
                                f"{type(value).__name__} values, not text — name a text column")
            index += 1
        if spec.max_docs is not None and len(docs) >= spec.max_docs:
            break
    return docs


def _load_dataset(spec, field: str, cache_dir: Path | None):
    """``datasets.load_dataset``: a hub name and a local directory of data files take the same
    path; a single local data file goes through its format's builder (json/csv/parquet)."""
    import datasets

    path = Path(spec.source).expanduser()
    kwargs = {"split": spec.split, "cache_dir": str(cache_dir) if cache_dir else None}
    try:
        with _quiet_progress_bars():
            if path.is_file():
                return datasets.load_dataset(DATA_SUFFIXES[path.suffix.lower()],
                                             data_files=str(path), **kwargs)
            return datasets.load_dataset(spec.source, spec.subset, **kwargs)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError...
        raise _dataset_error(spec, field, e, local=path.exists()) from None


def _dataset_error(spec, field: str, error: Exception, local: bool) -> DataError:
    reason = _short(error)
    if "Unknown split" in reason:
        return DataError(f"{field}.split", f"{reason} — set split to one of those")
    if "BuilderConfig" in reason:
        return DataError(f"{field}.subset", f"{reason} — set subset to one of those")
    fix = ("check that the directory holds .jsonl/.json/.csv/.parquet files" if local else
           "hub datasets need the network; use a local directory or builtin:pydoc")
    return DataError(f"{field}.source", f"cannot load dataset '{spec.source}': {reason} — {fix}")


@contextlib.contextmanager
def _quiet_progress_bars():
    """datasets draws progress bars on stderr, which garbles a TUI; restore them afterwards."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    were_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            enable_progress_bars()


# ---------------------------------------------------------------------------------------------
# held-out split


def _hash_int(doc_id: str) -> int:
    return int(hashlib.sha1(doc_id.encode("utf-8")).hexdigest(), 16)


def is_held_out(doc_id: str, eval_fraction: float) -> bool:
    """By a hash of the id, not by position: adding or removing documents never moves others
    between train and eval."""
    return _hash_int(doc_id) % 10_000 < eval_fraction * 10_000


def split_documents(docs: list[tuple[str, str]], eval_fraction: float
                    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval), each in the documents' order, both non-empty.

    If the hash holds out nothing, the document nearest to being held out (smallest hash
    remainder) becomes eval; if it holds out everything, the one farthest goes to train. A
    single document is cut in two at a line break, (1 - eval_fraction) of the way through.
    """
    if len(docs) == 1:
        head, tail = _cut_single_document(*docs[0], eval_fraction)
        return [head], [tail]
    held = {doc_id for doc_id, _ in docs if is_held_out(doc_id, eval_fraction)}
    by_remainder = sorted((d for d, _ in docs), key=lambda d: (_hash_int(d) % 10_000, _hash_int(d)))
    if not held:
        held = {by_remainder[0]}
    elif len(held) == len(docs):
        held.discard(by_remainder[-1])
    train = [d for d in docs if d[0] not in held]
    evals = [d for d in docs if d[0] in held]
    return train, evals


def _cut_single_document(doc_id: str, text: str, eval_fraction: float
                         ) -> tuple[tuple[str, str], tuple[str, str]]:
    """(head, tail) of a lone document: the tail (about eval_fraction of it, starting at a line
    where possible) is held out."""
    if len(text) < 2:
        raise DataError("source", "a task needs at least two characters of text — add more")
    target = min(max(int(len(text) * (1 - eval_fraction)), 1), len(text) - 1)
    cut = text.rfind("\n", 0, target) + 1  # just after a line break, else 0
    if not text[:cut].strip() or not text[cut:].strip():
        cut = target
    return (f"{doc_id}@train", text[:cut]), (f"{doc_id}@eval", text[cut:])


# ---------------------------------------------------------------------------------------------
# token streams and their cache


@dataclass
class TaskData:
    """A task's two token streams (documents joined with ``eos_id`` after each) and the sizes
    the trainer reports. ``eval_bytes`` (UTF-8 bytes of the eval text) and ``eval_tokens``
    (length of the eval stream, eos included) convert eval loss to bits per byte."""

    name: str
    train: np.ndarray
    eval: np.ndarray
    train_docs: int
    eval_docs: int
    train_bytes: int
    eval_bytes: int
    eval_tokens: int
    from_cache: bool = False


def load_task(name: str, spec, tokenizer, cache_dir: Path | None) -> TaskData:
    """Build (or load from ``cache_dir/corpora/<key>/``) the token streams of task `name`.

    The key covers everything the streams depend on: the task spec, the tokenizer, the Python
    version (builtin corpora come from the running Python), this module's FORMAT_VERSION, and
    for local sources the names, sizes and mtimes of their files. cache_dir=None: no cache.
    """
    field = f"tasks.{name}"
    if cache_dir is None:
        return _build_task(name, spec, tokenizer, field, None)
    corpora = Path(cache_dir) / "corpora"
    final = corpora / _cache_key(spec, tokenizer)
    cached = _read_cache(final, name)
    if cached is not None:
        return cached
    data = _build_task(name, spec, tokenizer, field, Path(cache_dir) / "datasets")
    _write_cache(corpora, final, data)
    return data


def _build_task(name: str, spec, tokenizer, field: str, datasets_cache: Path | None) -> TaskData:
    docs = list_documents(spec, field, datasets_cache)
    try:
        train_docs, eval_docs = split_documents(docs, spec.eval_fraction)
    except DataError as e:
        raise DataError(f"{field}.source", e.message) from None
    train, _ = _stream(train_docs, tokenizer)
    evals, eval_bytes = _stream(eval_docs, tokenizer)
    return TaskData(name=name, train=train, eval=evals, train_docs=len(train_docs),
                    eval_docs=len(eval_docs), train_bytes=_nbytes(train_docs),
                    eval_bytes=eval_bytes, eval_tokens=int(len(evals)))


def _stream(docs: list[tuple[str, str]], tokenizer) -> tuple[np.ndarray, int]:
    """Documents encoded and joined, each followed by eos; and their UTF-8 byte count."""
    texts = [text for _, text in docs]
    encoded = tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch") else \
        [tokenizer.encode(t) for t in texts]
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    parts = [piece for ids in encoded for piece in (np.asarray(ids, dtype=np.int32), eos)]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return stream, _nbytes(docs)


def _nbytes(docs: list[tuple[str, str]]) -> int:
    return sum(len(text.encode("utf-8")) for _, text in docs)


def _cache_key(spec, tokenizer) -> str:
    parts = [spec.model_dump_json(), tokenizer.name, sys.version, FORMAT_VERSION,
             _local_fingerprint(spec.source)]
    return hashlib.sha1("\n".join(parts).encode("utf-8")).hexdigest()[:20]


def _local_fingerprint(source: str) -> str:
    """Names, sizes and mtimes of a local source's files: editing them rebuilds the streams."""
    path = Path(source).expanduser()
    if source.startswith("builtin:") or not path.exists():
        return ""
    files = [path] if path.is_file() else _visible_files(path)
    return ";".join(f"{f.relative_to(path) if f != path else f.name}:{f.stat().st_size}:"
                    f"{f.stat().st_mtime_ns}" for f in files)


_META_KEYS = ("train_docs", "eval_docs", "train_bytes", "eval_bytes", "eval_tokens")


def _read_cache(directory: Path, name: str) -> TaskData | None:
    """The cached streams, or None if absent or unreadable (then they are rebuilt).
    train is memory-mapped (read-only): a hub dataset's stream can be large and is only
    sampled by train_batch, which copies what it takes."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        train = np.asarray(np.load(directory / "train.npy", mmap_mode="r"))
        evals = np.load(directory / "eval.npy")
    except (OSError, ValueError):
        return None
    counts = {k: meta.get(k) for k in _META_KEYS}
    if None in counts.values():
        return None
    return TaskData(name=name, train=train, eval=evals, from_cache=True, **counts)


def _write_cache(corpora: Path, final: Path, data: TaskData) -> None:
    def fill(tmp: Path) -> None:
        np.save(tmp / "train.npy", data.train)
        np.save(tmp / "eval.npy", data.eval)
        meta = {k: getattr(data, k) for k in _META_KEYS}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    write_dir_atomic(final, fill)  # final sits in corpora


def write_dir_atomic(final: Path, fill) -> None:
    """`fill(tmp)` writes into a temporary directory beside `final`, which is then renamed to
    `final`: readers never see a partial cache, and a writer that loses a race keeps the
    winner's (identical) files."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        fill(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# batches


def _windows(data: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows data[s : s+length] for each start, as int64. A stream shorter than `length` is
    repeated (np.resize tiles it) so that tiny tasks still yield full windows."""
    data = np.asarray(data)
    if len(data) == 0:
        raise ValueError("empty token stream")
    if len(data) < length:
        data = np.resize(data, length)
    return data[starts[:, None] + np.arange(length)].astype(np.int64)


def train_batch(data: np.ndarray, batch_size: int, seq_len: int, seed: int, stage: int,
                step: int) -> tuple[np.ndarray, np.ndarray]:
    """B random windows of T+1 tokens -> (inputs, targets), int64 [B, T].

    Stateless: offsets come from ``default_rng([seed, stage, step])``, so a resumed run draws
    exactly the batches it would have drawn. A stream shorter than T+1 is tiled to T+1.
    """
    length = seq_len + 1
    high = max(len(data) - length, 0) + 1
    starts = np.random.default_rng([seed, stage, step]).integers(0, high, size=batch_size)
    window = _windows(data, starts, length)
    return window[:, :-1], window[:, 1:]


def eval_batches(data: np.ndarray, batch_size: int, seq_len: int, n_batches: int
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """n_batches fixed batches of windows spread evenly over the eval stream: the same every
    call, so evaluations are comparable across steps and stages. Windows do not overlap when
    the stream holds n_batches * batch_size * (T+1) tokens; otherwise they overlap evenly."""
    length = seq_len + 1
    count = batch_size * n_batches
    last_start = max(len(data) - length, 0)
    starts = np.linspace(0, last_start, count).astype(np.int64)
    window = _windows(data, starts, length)
    return [(window[i:i + batch_size, :-1], window[i:i + batch_size, 1:])
            for i in range(0, count, batch_size)]


def bits_per_byte(mean_loss_nats: float, tokens: int, nbytes: int) -> float:
    """Eval loss (nats per token) as bits per UTF-8 byte: comparable across tokenizers."""
    if nbytes <= 0:
        return math.nan
    return mean_loss_nats * tokens / (nbytes * math.log(2))
