"""Export a grown model as one GGUF file, the format llama.cpp (and ollama, LM Studio, ...) runs and
transformers reads with ``from_pretrained(directory, gguf_file=name)``.

The model is first materialized exactly as for a Hugging Face directory (``hf_directory.materialize``:
adapters merged, weight-tied layers made real, widened modules folded into plain matrices), then
written the way llama.cpp's own converter (``convert_hf_to_gguf.py``) writes its family:

- tensor names from gguf's ``TensorNameMap`` (the table transformers' reader inverts);
- Llama's q/k rows permuted into llama.cpp's rope layout (the reader permutes them back);
- Gemma's RMSNorm gains stored as ``1 + w`` (Gemma scales by ``1 + w``; llama.cpp by the stored gain);
- 1-D tensors (norms, biases) always f32; q8_0 rows that are not a multiple of 32 fall back to f16;
- the architecture metadata, and the tokenizer: a Hugging Face BPE tokenizer (byte-level, as GPT-2,
  SmolLM and Qwen have; or sentencepiece-style with byte fallback, as Llama 2 has), or widen's byte
  tokenizer, written as a byte-level vocabulary with no merges so that every byte b keeps id 3 + b.

A GGUF has no key for some of a family's settings: llama.cpp hard-codes them and transformers' reader
takes its config class's defaults. A model whose config differs would load as a different model, so
it is refused in one line (each family's ``Assumption`` list in ``FAMILIES``), before anything is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.exports.hf_directory import ExportError

DTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_FILE = "model.gguf"
# max |Δlogits| allowed between the file read back by transformers and the in-widen model: f32 is exact
# up to float noise; the lossy dtypes are bounded as a share of the largest |logit|, since their error
# grows with the logits' scale. Measured (worst of the test families x 3 seeds of tiny random models /
# SmolLM2-135M): f16 0.18% / 0.11%, bf16 1.6% / 0.6%, q8_0 7.8% / 2.3%.
ABSOLUTE_TOLERANCE = {"f32": 1e-4}
RELATIVE_TOLERANCE = {"f16": 0.01, "bf16": 0.05, "q8_0": 0.2}


def parity_tolerance(dtype: str, reference) -> tuple[float, str]:
    """(max |Δlogits| allowed for a file of `dtype` against `reference` logits, how it was set)."""
    if dtype in ABSOLUTE_TOLERANCE:
        return ABSOLUTE_TOLERANCE[dtype], "absolute"
    scale = float(reference.abs().max())
    share = RELATIVE_TOLERANCE[dtype]
    return share * max(scale, 1.0), f"{share:.0%} of the largest |logit|, {scale:.3g}"


class GgufExportError(ExportError):
    """A model, tokenizer or destination a GGUF export cannot write as asked; the message says why."""


# ---------------------------------------------------------------------------------------------
# families

READER = "transformers' GGUF reader"
LLAMA_CPP = "llama.cpp"


@dataclass(frozen=True)
class Assumption:
    """A setting a GGUF cannot state: `by` builds the model with `expected` (a value, or a function
    of the config) whatever the model had."""

    field: str
    expected: object
    by: str
    read: Callable | None = None  # how to read it from the config (default: the attribute)

    def problem(self, config) -> str | None:
        actual = self.read(config) if self.read else getattr(config, self.field, None)
        expected = self.expected(config) if callable(self.expected) else self.expected
        if actual == expected:
            return None
        return f"{self.field} is {actual!r} but {self.by} assumes {expected!r} (a GGUF has no key for it)"


@dataclass(frozen=True)
class GgufFamily:
    arch: str                                 # general.architecture: a gguf.MODEL_ARCH name
    rope_permute: bool = False                # llama.cpp's llama graph rotates adjacent pairs (q/k rows reordered)
    norm_shift: float = 0.0                   # added to every "*norm.weight" (Gemma: 1 + w)
    head_is_embedding: bool = False           # llama.cpp reads no output.weight: the head must be tied
    assumptions: tuple[Assumption, ...] = ()
    keys: dict = field(default_factory=dict)  # extra metadata: GGUFWriter method -> config field


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_pattern(period: int):
    """Gemma's sliding/full layer pattern as llama.cpp hard-codes it: the last of every `period` is full."""
    return lambda config: ["full_attention" if i % period == period - 1 else "sliding_attention"
                           for i in range(config.num_hidden_layers)]


def _rope_theta(config, layer_type: str | None = None) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    elif "full_attention" in params:
        params = params["full_attention"]
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


_SILU = Assumption("hidden_act", "silu", LLAMA_CPP)
_NO_BIASES = (Assumption("attention_bias", False, READER, read=lambda c: bool(getattr(c, "attention_bias", False))),
              Assumption("mlp_bias", False, READER, read=lambda c: bool(getattr(c, "mlp_bias", False))))
_NO_WINDOW = Assumption("use_sliding_window", False, READER)
_GELU = Assumption("hidden_activation", "gelu_pytorch_tanh", LLAMA_CPP)
# llama.cpp scales Gemma's queries by 1/sqrt(head_dim); the reader takes the config default 256
_QUERY_SCALE = (Assumption("query_pre_attn_scalar", _head_dim, LLAMA_CPP),
                Assumption("query_pre_attn_scalar", 256, READER))
_LLAMA = GgufFamily("llama", rope_permute=True, assumptions=(_SILU, *_NO_BIASES))

# config.model_type -> how its GGUF is written. Mistral is written as llama, as llama.cpp's converter
# does (its graph has no sliding window: the same model for sequences up to the window).
FAMILIES: dict[str, GgufFamily] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": GgufFamily("qwen2", assumptions=(
        _SILU, _NO_WINDOW,
        # the reader derives Qwen2's head_dim from hidden_size / heads
        Assumption("head_dim", lambda c: c.hidden_size // c.num_attention_heads, READER, read=_head_dim))),
    "qwen3": GgufFamily("qwen3", assumptions=(
        _SILU, _NO_WINDOW, Assumption("attention_bias", False, READER),
        # the reader does not read qwen3's attention.key_length: Qwen3Config's default 128 applies
        Assumption("head_dim", 128, READER, read=_head_dim))),
    "gemma2": GgufFamily("gemma2", norm_shift=1.0, head_is_embedding=True, assumptions=(
        _GELU, *_QUERY_SCALE,
        Assumption("attn_logit_softcapping", 50.0, READER),
        Assumption("final_logit_softcapping", 30.0, READER),
        Assumption("layer_types", _layer_pattern(2), f"{LLAMA_CPP} (and {READER})")),
        keys={"add_attn_logit_softcapping": "attn_logit_softcapping",
              "add_final_logit_softcapping": "final_logit_softcapping", "add_sliding_window": "sliding_window"}),
    "gemma3_text": GgufFamily("gemma3", norm_shift=1.0, head_is_embedding=True, assumptions=(
        _GELU, *_QUERY_SCALE,
        Assumption("attn_logit_softcapping", None, LLAMA_CPP),
        Assumption("final_logit_softcapping", None, READER),
        Assumption("layer_types", _layer_pattern(6), f"{LLAMA_CPP} (and {READER})"),
        Assumption("sliding-window rope_theta", 10000.0, f"{LLAMA_CPP} (and {READER})",
                   read=lambda c: _rope_theta(c, "sliding_attention"))),
        keys={"add_sliding_window": "sliding_window"}),
}


def model_type_of(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or "the built-in MLP"


def gguf_family(model) -> GgufFamily:
    """The GGUF layout of the model's family; GgufExportError names the supported ones otherwise."""
    model_type = model_type_of(model)
    if model_type not in FAMILIES:
        raise GgufExportError(f"--format gguf: {model_type} models are not supported — GGUF export covers "
                              f"{', '.join(FAMILIES)} (use --format hf for the rest)")
    return FAMILIES[model_type]


def _rope_types(config) -> list[str]:
    """The rope type of every rope the config has (Gemma 3: one per layer type)."""
    params = getattr(config, "rope_parameters", None) or {}
    scopes = [scope for scope in params.values() if isinstance(scope, dict)] or [params]
    return [scope.get("rope_type", "default") for scope in scopes]


def check_config(config, family: GgufFamily) -> None:
    """Refuse, in one line, a config the file could not describe."""
    model_type = config.model_type
    for rope_type in _rope_types(config):
        if rope_type != "default":
            raise GgufExportError(f"--format gguf: the {model_type} model uses '{rope_type}' rope scaling, which "
                                  f"{READER} does not read back, so the file could not be checked — use --format hf")
    for assumption in family.assumptions:
        problem = assumption.problem(config)
        if problem:
            raise GgufExportError(f"--format gguf: the {model_type} model's {problem} — use --format hf")


# ---------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class Vocabulary:
    """The tokenizer as GGUF metadata (tokenizer.ggml.*)."""

    model: str                     # "gpt2" (byte-level BPE) or "llama" (sentencepiece-style)
    pre: str                       # llama.cpp's name for the pre-tokenizer
    tokens: list[str]
    types: list[int]               # gguf.TokenType
    merges: list[str]
    scores: list[float] | None = None
    special_ids: dict = field(default_factory=dict)  # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False  # sentencepiece-style only
    chat_template: str | None = None


def byte_vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """widen's byte tokenizer (ByT5 ids: 0 pad, 1 eos, 2 unk, 3 + b for byte b) as a byte-level BPE
    with no merges: every byte stays its own token, so a reader's ids are widen's."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()  # byte -> the printable character a byte-level vocabulary spells it with
    tokens = ["<pad>", "</s>", "<unk>"] + [spelling[b] for b in range(256)]
    types = [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN] + [gguf.TokenType.NORMAL] * 256
    tokens, types = _pad_tokens(tokens, types, vocab_size)
    ids = {"bos": tokenizer.eos_id, "eos": tokenizer.eos_id, "unk": tokenizer.unk_id, "pad": tokenizer.pad_id}
    return Vocabulary("gpt2", "gpt-2", tokens, types, merges=[], special_ids=ids)


def _pad_tokens(tokens: list[str], types: list[int], vocab_size: int) -> tuple[list[str], list[int]]:
    """Embedding rows past the tokenizer's last id get placeholder tokens, as llama.cpp's converter writes."""
    import gguf

    if len(tokens) > vocab_size:
        raise GgufExportError(f"--format gguf: the tokenizer has {len(tokens)} ids but the model's vocabulary has "
                              f"{vocab_size} rows")
    extra = range(len(tokens), vocab_size)
    return tokens + [f"[PAD{i}]" for i in extra], types + [gguf.TokenType.UNUSED] * len(extra)


# pre-tokenizers llama.cpp and transformers' reader both know, by the Split regex a tokenizer.json holds
_PREFERRED_PRE = ("llama-bpe", "qwen2", "gpt-4o", "tekken")


def _pre_tokenizer_name(spec: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer (tokenizer.json's), or None when unknown."""
    try:  # the reader's own table: a name it knows rebuilds exactly this Split
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        GGUF_PRE_TOKENIZER_SPLITS = {}

    steps = (spec or {}).get("pretokenizers") if (spec or {}).get("type") == "Sequence" else [spec or {}]
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        return None
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        names = [name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == pattern]
        return next((name for name in _PREFERRED_PRE if name in names), names[0] if names else None)
    return None


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter treats as control even when not marked special."""
    return token.startswith("<|") and token.endswith("|>")


def _token_type(token: str | None, added, sentencepiece: bool, unk: str | None) -> int:
    """llama.cpp's type of a token: added ones control (special) or user-defined, sentencepiece's
    unknown and <0xXX> byte tokens their own types, ids without a token unused."""
    import gguf

    kind = gguf.TokenType
    if token is None:
        return kind.UNUSED
    if added is not None:
        return kind.CONTROL if added.special or _looks_special(token) else kind.USER_DEFINED
    if sentencepiece and token == unk:
        return kind.UNKNOWN
    if sentencepiece and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
        return kind.BYTE
    return kind.NORMAL


def hf_vocabulary(hf, vocab_size: int) -> Vocabulary:
    """A fast Hugging Face BPE tokenizer as GGUF metadata (what llama.cpp's converter writes for it)."""
    import gguf

    spec = json.loads(hf.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GgufExportError(f"--format gguf: the tokenizer is a {model.get('type')} tokenizer; GGUF export writes "
                              "BPE tokenizers (byte-level, or sentencepiece-style with byte fallback) and widen's "
                              "byte tokenizer — use --format hf")
    sentencepiece = bool(model.get("byte_fallback"))
    pre = "default" if sentencepiece else _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise GgufExportError("--format gguf: the tokenizer's pre-tokenizer (tokenizer.json "
                              f"{json.dumps(spec.get('pre_tokenizer'))[:120]}) is not one llama.cpp names — "
                              "use --format hf")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if any(m.count(" ") != 1 for m in merges):
        raise GgufExportError("--format gguf: the tokenizer has merges of tokens containing spaces, which GGUF's "
                              "\"a b\" merge list cannot hold — use --format hf")

    by_id = {i: t for t, i in hf.get_vocab().items()}
    ids = range(max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in ids]
    types = [_token_type(by_id.get(i), hf.added_tokens_decoder.get(i), sentencepiece, model.get("unk_token"))
             for i in ids]
    tokens, types = _pad_tokens(tokens, types, vocab_size)

    scores = None
    if sentencepiece:
        # llama.cpp's sentencepiece tokenizer merges the pair whose result scores highest: the merge rank
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
        scores = [-float(rank.get(t, 0)) if kind == gguf.TokenType.NORMAL else 0.0 for t, kind in zip(tokens, types)]

    probe = hf("a")["input_ids"]  # whether encoding adds BOS / EOS, whatever mechanism does it
    first = hf.convert_ids_to_tokens(hf("a", add_special_tokens=False)["input_ids"])[:1]
    ids = {"bos": hf.bos_token_id, "eos": hf.eos_token_id, "unk": hf.unk_token_id, "pad": hf.pad_token_id}
    template = hf.chat_template if isinstance(getattr(hf, "chat_template", None), str) else None
    return Vocabulary("llama" if sentencepiece else "gpt2", pre, tokens, types, merges, scores,
                      special_ids={k: v for k, v in ids.items() if v is not None},
                      add_bos=ids["bos"] is not None and probe[:1] == [ids["bos"]],
                      add_eos=ids["eos"] is not None and len(probe) > 1 and probe[-1:] == [ids["eos"]],
                      chat_template=template,
                      # "a" -> "▁a" (or its first byte): the tokenizer puts a space before the text
                      add_space_prefix=sentencepiece and bool(first) and first[0].startswith(("▁", "<0xE2>")))


def vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """The GGUF vocabulary of a widen tokenizer (ByteTokenizer or HFTokenizer)."""
    if getattr(tokenizer, "name", None) == "bytes":
        return byte_vocabulary(tokenizer, vocab_size)
    hf = getattr(tokenizer, "hf", None)
    if hf is None or not hasattr(hf, "backend_tokenizer"):
        raise GgufExportError("--format gguf: the tokenizer is not a fast Hugging Face tokenizer (no tokenizer.json "
                              "model to write) — use --format hf")
    return hf_vocabulary(hf, vocab_size)


# ---------------------------------------------------------------------------------------------
# writing


def gguf_path(out: Path | str) -> Path:
    """OUT ending in .gguf is the file; any other OUT is a directory that gets model.gguf."""
    out = Path(out)
    if out.suffix.lower() == ".gguf":
        if out.is_dir():
            raise GgufExportError(f"{out} is a directory — give a file name ending in .gguf, or a directory")
        return out
    if out.exists() and not out.is_dir():
        raise GgufExportError(f"{out} exists and is not a directory — give a .gguf file name or a directory")
    return out / DEFAULT_FILE


def rope_permute(weight, heads: int):
    """llama.cpp's ``LlamaModel.permute``: each head's rows from halves [x0..x(d/2) | y0..] to pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _storage_type(gguf_name: str, data, dtype: str):
    """How llama.cpp's converter stores a tensor: 1-D ones and norms f32, the rest in `dtype`."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]


def _encode(data, qtype):
    """(bytes or array to write, the type it is stored as): a q8_0 row that is not a multiple of 32
    is stored f16, as llama.cpp's converter does."""
    import gguf

    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        f16 = gguf.GGMLQuantizationType.F16
        return gguf.quants.quantize(data, f16), f16


def _writer_class():
    import gguf

    class Writer(gguf.GGUFWriter):
        """gguf's writer refuses empty arrays, which GGUF allows: the byte tokenizer has no merges,
        and llama.cpp needs the (empty) merge list to be there."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def _write_vocabulary(writer, vocab: Vocabulary) -> None:
    import gguf

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types([int(t) for t in vocab.types])
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, vocab.merges, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for kind, token_id in vocab.special_ids.items():
        adders[kind](int(token_id))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _write_architecture(writer, config, family: GgufFamily, file_type) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for method, config_field in family.keys.items():
        getattr(writer, method)(getattr(config, config_field))
    writer.add_file_type(file_type)


def _tensors(model, family: GgufFamily, dtype: str):
    """(GGUF name, stored data, stored type) of every tensor, in llama.cpp's layout."""
    import gguf
    import torch

    config = model.config
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == family.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tied = head is embedding or (head.shape == embedding.shape and torch.equal(head, embedding))
    if family.head_is_embedding and not tied:
        raise GgufExportError(f"--format gguf: the {config.model_type} model's lm_head differs from its embedding, "
                              f"but {LLAMA_CPP}'s {family.arch} graph uses the embedding as the output layer — use "
                              "--format hf")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_module = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == f"{head_module}.weight":
            continue  # the reader ties the head back to the embedding when output.weight is absent
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise GgufExportError(f"--format gguf: tensor {hf_name} has no GGUF name in the {family.arch} layout — "
                                  "an operator left a module llama.cpp does not know; use --format hf")
        data = tensor.detach().to("cpu", torch.float32)
        if family.rope_permute and base.endswith(("q_proj", "k_proj")):
            data = rope_permute(data, heads if base.endswith("q_proj") else kv_heads)
        if family.norm_shift and hf_name.endswith("norm.weight"):
            data = data + family.norm_shift
        name = f"{gguf_name}.{suffix}"
        array, qtype = _encode(data.numpy(), _storage_type(name, data, dtype))
        yield name, array, qtype


def write_gguf(model, vocab: Vocabulary, path: Path, dtype: str, family: GgufFamily,
               name: str = "", manifest: dict | None = None) -> dict[str, int]:
    """Write a materialized model and its vocabulary as one GGUF; returns how many tensors went to
    each storage type ({"F16": 12, "F32": 9})."""
    import gguf

    from engine.runs.rundir import dumps_json

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _writer_class()(str(path), family.arch)
    counts: dict[str, int] = {}
    try:
        # never exactly "mistral": transformers' reader would then build MistralConfig from a llama file
        writer.add_name(f"widen:{name or model.config.model_type}")
        _write_architecture(writer, model.config, family, file_types[dtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_vocabulary(writer, vocab)
        if manifest:
            writer.add_string("widen.export", dumps_json(manifest))
        for tensor_name, array, qtype in _tensors(model, family, dtype):
            writer.add_tensor(tensor_name, array, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return counts


def export_gguf(model, tokenizer, out: Path | str, dtype: str = "f32", source: dict | None = None,
                reports: list[dict] | None = None) -> dict:
    """Materialize the model (as the Hugging Face export does) and write it as one GGUF at
    ``gguf_path(out)``. Returns the manifest (also stored in the file as ``widen.export``), with
    ``path`` and ``tensor_types`` added."""
    from engine.exports.hf_directory import export_manifest, materialize
    from engine.model.view import ArchView, count_params
    from engine.ops.adapters import adapter_layers

    if dtype not in DTYPES:
        raise GgufExportError(f"--dtype {dtype}: GGUF export writes {', '.join(DTYPES)}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GgufExportError("--format gguf needs the gguf package, which is not installed — "
                              "pip install 'widen[gguf]'") from None
    family = gguf_family(model)
    path = gguf_path(out)
    had_adapters = bool(adapter_layers(model))
    params_before = count_params(model)
    model = materialize(model)
    check_config(model.config, family)
    vocab = vocabulary(tokenizer, model.get_input_embeddings().weight.shape[0])
    manifest = export_manifest(model, ArchView(model.config, model), source, reports, params_before,
                               adapters="merged" if had_adapters else "none")
    manifest.update(gguf_architecture=family.arch, dtype=dtype)
    counts = write_gguf(model, vocab, path, dtype, family, name=(source or {}).get("plan_name", ""),
                        manifest=manifest)
    return {**manifest, "path": str(path), "tensor_types": counts}


# ---------------------------------------------------------------------------------------------
# reading back


def load_gguf(path: Path | str):
    """The file as a user would load it: transformers' AutoModelForCausalLM from the GGUF, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    with contextlib.redirect_stderr(io.StringIO()):  # the reader's own progress bar
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def verify_gguf(path: Path | str, batch, reference) -> float:
    """Read the file back with transformers; max |Δlogits| against `reference` on the probe batch."""
    import torch

    from engine.model.forward import forward_logits

    with torch.no_grad():
        logits = forward_logits(load_gguf(path), batch[0].to("cpu")).float()
    return float((logits - reference.to("cpu").float()).abs().max())
