"""Model sources: built-in configurations, hub names and local directories (one code path).

``builtin:<name>`` is built from a config here (random init, seeded): no download. Anything
else goes through ``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained``, which treats a hub
name and a local directory alike.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from engine.errors import ModelLoadError
from engine.model import gguf
from engine.model.families import FAMILY_OVERRIDE_ATTR
from engine.model.view import ArchView, UnsupportedArchitecture, module_tree_differences

# A tiny model in the layout of TinyStories-33M (GPT-Neo, alternating global/local attention),
# sized for a 2-core CPU. vocab 259 = the byte tokenizer (ByT5 layout).
BUILTIN_MODELS: dict[str, dict] = {
    "tiny-neo": dict(
        model_type="gpt_neo", vocab_size=259, hidden_size=128, num_layers=4, num_heads=4,
        attention_types=[[["global", "local"], 2]], max_position_embeddings=512, window_size=64,
        intermediate_size=512, activation_function="gelu_new", embed_dropout=0.0,
        attention_dropout=0.0, resid_dropout=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        tie_word_embeddings=True,
    ),
    # The same family at a quarter of its width budget and half its depth (2 layers, d_model 64,
    # 2 heads of 32, FFN 256): the start of experiments/progressive_growth.toml, which grows it
    # to tiny-neo's shape (widen_hidden duplicate: 4 heads of 32; widen_ffn: 512; map_layers
    # repeat = 2: global/local twice).
    "tiny-neo-small": dict(
        model_type="gpt_neo", vocab_size=259, hidden_size=64, num_layers=2, num_heads=2,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=512, window_size=64,
        intermediate_size=256, activation_function="gelu_new", embed_dropout=0.0,
        attention_dropout=0.0, resid_dropout=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        tie_word_embeddings=True,
    ),
    # A Llama-shaped model of the same size (4 layers, d_model 128, 4 heads of 32 sharing 2
    # key/value heads, SwiGLU FFN 344: its 3 x 128 x 344 FFN weights match tiny-neo's
    # 2 x 128 x 512), so the operators GPT-Neo has no class for apply to a built-in model:
    # upcycle makes it a Mixtral (docs/moe.md).
    "tiny-llama": dict(
        model_type="llama", vocab_size=259, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=344, hidden_act="silu", max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
    ),
    # The growth recipes' family (experiments/growth_recipes.toml): Llama blocks, heads of 64, a
    # SwiGLU FFN of 2.6875 × d_model (688 at 256) and the byte vocabulary. The target, 8 × 256
    # (6.4M parameters), and the shapes its recipes start from: one layer (the zero/one-layer
    # recipe), two (G_stack ×4, MIDAS), half the width (SPARKLING's width doubling).
    **{f"llama-{layers}x{width}": dict(
        model_type="llama", vocab_size=259, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=width // 64, num_key_value_heads=width // 64, intermediate_size=width * 43 // 16,
        hidden_act="silu", max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=1,
        pad_token_id=0, tie_word_embeddings=True)
       for layers, width in ((8, 256), (1, 256), (2, 256), (8, 128))},
}


# A small MLP over bytes (the on-the-fly-expansion note's setting): embedding -> Linear/GELU
# hidden layers -> logits. It predicts the next byte from the current one (a bigram model), so it
# trains on the same text tasks as the transformers; widen_mlp grows its hidden layers.
BUILTIN_MLPS: dict[str, dict] = {
    "mlp": dict(vocab_size=259, embedding=64, hidden=(128, 128)),
}


def build_builtin_mlp(name: str, seed: int):
    import torch
    from torch import nn

    fields = BUILTIN_MLPS[name]
    widths = [fields["embedding"], *fields["hidden"]]
    layers: list[nn.Module] = [nn.Embedding(fields["vocab_size"], fields["embedding"])]
    for width_in, width_out in zip(widths, widths[1:]):
        layers += [nn.Linear(width_in, width_out), nn.GELU()]
    layers.append(nn.Linear(widths[-1], fields["vocab_size"]))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(*layers)


def builtin_fields(source: str) -> dict:
    name = source.removeprefix("builtin:")
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown built-in model '{name}' — built-in models: "
                             f"{', '.join('builtin:' + n for n in [*BUILTIN_MODELS, *BUILTIN_MLPS])}")
    return dict(BUILTIN_MODELS[name])


def load_config(spec):
    """The model's config, without weights. `spec` is a plan's ModelSpec."""
    import transformers
    from transformers import AutoConfig

    transformers.logging.set_verbosity_error()
    source = spec.source
    if source.startswith("builtin:"):
        fields = builtin_fields(source)
        return _with_family(AutoConfig.for_model(fields.pop("model_type"), **fields), spec)
    location = gguf.spec_location(spec)
    if location is not None:
        return _with_family(gguf.load_config(location, spec.revision), spec)
    try:
        return _with_family(AutoConfig.from_pretrained(source, revision=spec.revision), spec)
    except (OSError, ValueError) as e:
        where = "local directory" if Path(source).exists() else "hub name"
        reason = str(e).strip().splitlines()[0][:160]
        raise ModelLoadError(f"cannot load a model config from {where} '{source}': {reason} — use "
                             f"builtin:tiny-neo, a local model directory, or a hub name (needs the network)") from None


def _with_family(config, spec):
    """The config, naming the plan's `[model] family` when it has one (engine.model.families.family_of
    reads it; saved with the config, so checkpoints and exports keep it)."""
    if getattr(spec, "family", None):
        setattr(config, FAMILY_OVERRIDE_ATTR, spec.family)
    return config


def check_module_tree(model, view: ArchView) -> None:
    """A model described by a family it named ([model] family) must have that family's module tree:
    one error naming what differs."""
    if not getattr(model.config, FAMILY_OVERRIDE_ATTR, None):
        return
    differences = module_tree_differences(view.family, model)
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise ModelLoadError(f"{model.config.model_type} models do not have the {view.family.name} module tree: "
                             f"{shown} — name the family whose tree this is, or leave family out", field="family")


def _check_tree_from_config(config, view: ArchView) -> None:
    """The module-tree check without weights: the model built on the meta device (no memory)."""
    import torch
    import transformers

    auto = transformers.AutoModelForSeq2SeqLM if view.family.kind == "seq2seq" else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    check_module_tree(model, view)


def load_architecture(spec) -> ArchView:
    """The architecture view from the config alone. Built-in models need no transformers (so
    `widen plan check` / `widen run --detach` stay fast); others load the config with AutoConfig."""
    if spec.source.removeprefix("builtin:") in BUILTIN_MLPS:
        return ArchView.of(build_builtin_mlp(spec.source.removeprefix("builtin:"), 0))
    if spec.source.startswith("builtin:") and not getattr(spec, "family", None):
        config = SimpleNamespace(**builtin_fields(spec.source))
    else:
        config = load_config(spec)
    try:
        view = ArchView(config)
    except UnsupportedArchitecture as e:
        raise ModelLoadError(str(e)) from None
    if getattr(spec, "family", None):
        _check_tree_from_config(config, view)
    return view


def choose_attention(auto, config, requested: str = "sdpa") -> tuple[str, str | None]:
    """(implementation, why sdpa was not used or None). sdpa where the family's model class has
    transformers' sdpa path, else eager with a one-line reason the engine logs: never a silent switch."""
    if requested == "eager":
        return "eager", None
    try:
        model_class = auto._model_mapping[type(config)]
    except (KeyError, AttributeError):  # a class Auto does not map: load_model tries sdpa and falls back
        return "sdpa", None
    if not getattr(model_class, "_supports_sdpa", False):
        return "eager", (f"train.attention: \"sdpa\" asked, but transformers' {model_class.__name__} has no sdpa "
                         f"kernel — eager used (train.attention = \"eager\" asks for it)")
    return "sdpa", None


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory) and their buffers
    real: the non-persistent ones (rotary frequencies, causal masks) are in no weight file, so a
    model built this way is whole once its parameters are filled (``engine.train.fsdp.load_sharded``).
    A parameter already on meta is kept as is, so weight tying keeps one tensor."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def materialize_skeleton(model, device) -> None:
    """Give a skeleton's meta parameters memory on `device` (uninitialized: the caller fills them),
    keeping its real buffers' values (``to_empty`` alone would leave them uninitialized too)."""
    import torch

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    owners, ties = {}, []  # a tied parameter: one tensor in two modules (to_empty makes two of it)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) in owners:
                    ties.append((module, name, owners[id(p)]))
                else:
                    owners[id(p)] = (module, name)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    for module, name, (owner, owner_name) in ties:
        if module._parameters[name] is not owner._parameters[owner_name]:
            setattr(module, name, owner._parameters[owner_name])


def placeholder_model(spec, seed: int, attention: str = "sdpa"):
    """The plan's model with placeholder values (a fixed small normal draw), nothing read from
    its source: the shape to replay a run's expansions on before its own weights are loaded in
    (a resume, an FSDP run's gather) — a 7B model is not read from disk again mid-run."""
    import torch

    model, view = load_model(spec, seed, attention=attention, skeleton=True)
    if any(p.is_meta for p in model.parameters()):
        materialize_skeleton(model, "cpu")
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    return model, view


def safetensors_files(spec) -> list[Path]:
    """A plan's local model directory's safetensors weight files (none for a hub name, a GGUF or
    other formats)."""
    if gguf.spec_location(spec) is not None:
        return []
    path = Path(spec.source)
    return sorted(path.glob("*.safetensors")) if path.is_dir() else []


def load_model(spec, seed: int, attention: str = "sdpa", skeleton: bool = False):
    """Build (built-in) or load (hub name or local directory: the same call) the model with the
    Auto class of its family's kind (causal LM, or seq2seq for T5); returns (model, ArchView).

    `attention` is train.attention: "sdpa" uses PyTorch's fused attention where the family has it,
    else eager; `model.attention_fallback` then holds the one-line reason (None when as asked).
    `skeleton`: the same model with its parameters on the meta device and nothing read from the
    weight files (``parameters_on_meta``): the shape to shard before its values are streamed in."""
    import torch
    import transformers

    if spec.source.removeprefix("builtin:") in BUILTIN_MLPS:
        model = build_builtin_mlp(spec.source.removeprefix("builtin:"), seed)
        return model, ArchView.of(model)
    config = load_config(spec)
    try:
        kind = ArchView(config).family.kind
    except UnsupportedArchitecture as e:
        raise ModelLoadError(str(e)) from None
    auto = transformers.AutoModelForSeq2SeqLM if kind == "seq2seq" else transformers.AutoModelForCausalLM
    implementation, fallback = choose_attention(auto, config, attention)
    location = gguf.spec_location(spec)

    def build(implementation: str):
        if skeleton:
            with parameters_on_meta():
                return auto.from_config(config, attn_implementation=implementation)
        if spec.source.startswith("builtin:"):
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                return auto.from_config(config, attn_implementation=implementation)
        # the config loaded above: it carries the plan's [model] family, if any
        if location is not None:
            return gguf.load_model(location, auto, config, spec.revision, implementation)
        return auto.from_pretrained(spec.source, config=config, revision=spec.revision,
                                    attn_implementation=implementation)

    try:
        model = build(implementation)
    except ValueError as e:  # transformers refuses sdpa for this class: say so, use eager
        if implementation != "sdpa" or "attention" not in str(e):
            raise
        fallback = (f"train.attention: \"sdpa\" refused by transformers ({str(e).splitlines()[0][:100]}) — "
                    f"eager used (train.attention = \"eager\" asks for it)")
        model = build("eager")
    model.attention_fallback = fallback
    view = ArchView(model.config, model)
    check_module_tree(model, view)
    return model, view


def check_vocabulary(model, tokenizer) -> None:
    """Every token id the tokenizer can produce must have an embedding row."""
    import torch

    if isinstance(model, torch.nn.Sequential):  # a built-in MLP: its first child embeds
        vocab = model[0].num_embeddings if isinstance(model[0], torch.nn.Embedding) else None
        if vocab is None:
            return
    else:
        vocab = model.get_input_embeddings().num_embeddings
    if tokenizer.vocab_size > vocab:
        raise ModelLoadError(f"model.tokenizer: the tokenizer has {tokenizer.vocab_size} ids but the model's "
                             f"vocabulary has {vocab} — use the model's own tokenizer", field="tokenizer")


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def is_config_only(source: str) -> bool:
    """A local model directory with a config.json and no weight files: a shape to plan for
    (``widen plan show`` previews it on the meta device)."""
    path = Path(source)
    return (path.is_dir() and (path / "config.json").is_file()
            and not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES))
