"""GGUF sources: a llama.cpp-format file, read through transformers' own GGUF loader.

A plan names one as ``[model] source = "path/model.gguf"``, or as a directory (or hub name) with
``gguf_file = "model.gguf"``: the same ``from_pretrained(directory, gguf_file=...)`` call either way,
so a hub name and a local directory stay one code path. transformers dequantizes every tensor to
float32 on load; the config alone is read from the file's metadata, without dequantizing, which is
what ``widen plan check`` does.

transformers marks a model loaded from GGUF as quantized (``config.quantization_config``, an
``hf_quantizer``), and then refuses ``save_pretrained``. Its tensors are plain float32 by then, so
``as_plain_model`` drops those marks: a loaded GGUF model trains, grows and exports like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelLoadError

GGUF_SUFFIX = ".gguf"
# `[model] tokenizer = "gguf"`: the tokenizer stored in the model's own GGUF file.
TOKENIZER_FROM_MODEL = "gguf"
INSTALL_HINT = "pip install 'widen[gguf]' (the gguf package)"


@dataclass(frozen=True)
class GgufLocation:
    """Where a GGUF file is, as transformers takes it: ``from_pretrained(directory, gguf_file=file)``."""

    directory: str  # a local directory or a hub name
    file: str       # the file's name inside it

    @property
    def local_path(self) -> Path | None:
        path = Path(self.directory).expanduser() / self.file
        return path if path.exists() else None

    def __str__(self) -> str:
        return str(Path(self.directory) / self.file)


def is_gguf_path(name: str) -> bool:
    return name.lower().endswith(GGUF_SUFFIX)


def gguf_location(source: str, gguf_file: str | None = None) -> GgufLocation | None:
    """The GGUF a model source names, or None for every other source."""
    if gguf_file:
        return GgufLocation(source, gguf_file)
    if is_gguf_path(source):
        path = Path(source).expanduser()
        return GgufLocation(str(path.parent), path.name)
    return None


def spec_location(spec) -> GgufLocation | None:
    """The GGUF of a plan's ModelSpec (None when its source is not one)."""
    return gguf_location(spec.source, getattr(spec, "gguf_file", None))


def tokenizer_location(tokenizer: str, model_spec=None) -> GgufLocation | None:
    """The GGUF a `[model] tokenizer` names: "gguf" (the model's own file) or a path to a .gguf."""
    if tokenizer == TOKENIZER_FROM_MODEL:
        location = spec_location(model_spec) if model_spec is not None else None
        if location is None:
            raise ModelLoadError('model.tokenizer = "gguf" reads the tokenizer from the model\'s GGUF, but model.source '
                            'is not a GGUF — give a .gguf source (or gguf_file), or a tokenizer directory',
                            field="tokenizer")
        return location
    return gguf_location(tokenizer)


def require_package(field: str = "source") -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"reading a GGUF needs the gguf package, which is not installed — {INSTALL_HINT}",
                        field=field) from None


def load_config(location: GgufLocation, revision: str | None = None):
    """The model's config from the GGUF's metadata (nothing dequantized)."""
    from transformers import AutoConfig

    require_package()
    try:
        return AutoConfig.from_pretrained(location.directory, gguf_file=location.file, revision=revision)
    except ValueError as e:
        raise _explained(location, e) from None
    except OSError as e:
        where = "file" if location.local_path else "GGUF"
        raise ModelLoadError(f"cannot read the {where} {location}: {_first_line(e)} — give an existing .gguf file, "
                        "or a directory (or hub name) with gguf_file naming a file in it") from None


def load_model(location: GgufLocation, auto, config, revision: str | None, attn_implementation: str):
    """The model, every tensor dequantized to float32 by transformers, as a plain model."""
    require_package()
    try:
        model = auto.from_pretrained(location.directory, gguf_file=location.file, config=config,
                                     revision=revision, attn_implementation=attn_implementation)
    except ValueError as e:
        if "attention" in str(e):  # the caller's sdpa -> eager fallback
            raise
        raise _explained(location, e) from None
    return as_plain_model(model)


def as_plain_model(model):
    """Drop transformers' "quantized" marks from a model loaded from GGUF (its tensors are already
    float32), so that it saves, copies and exports like a model loaded from safetensors."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return model


def load_tokenizer(location: GgufLocation):
    from transformers import AutoTokenizer

    require_package(field="tokenizer")
    return AutoTokenizer.from_pretrained(location.directory, gguf_file=location.file)


def architecture(location: GgufLocation) -> str | None:
    """`general.architecture` of a local GGUF, read from its header alone."""
    path = location.local_path
    if path is None:
        return None
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("general.architecture")
    return field.contents() if field is not None else None


def _explained(location: GgufLocation, error: ValueError) -> ModelLoadError:
    """transformers' refusal of a GGUF, in one line that names the architecture and the way out."""
    message = _first_line(error)
    if "architecture" in message and "not supported" in message:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        name = architecture(location) or message
        return ModelLoadError(f"{location}: GGUF architecture '{name}' is not one transformers reads from GGUF "
                         f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}) — convert the model to a "
                         "Hugging Face directory and give that as model.source")
    return ModelLoadError(f"cannot load the GGUF {location}: {message} — give a GGUF file written by llama.cpp's "
                          "converter or widen export --format gguf")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0].strip() if lines else error.__class__.__name__)[:200]
