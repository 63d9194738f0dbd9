"""The uniform view over a model: blocks, FFNs and config fields, via the family description.

``ArchView`` works from a config alone (for plan checks and parameter previews) or over a live
model (for the operators).
"""

from __future__ import annotations

from dataclasses import replace

from engine.arch.families import (FAMILIES, ArchFamily, AttentionLayout, FFNLayout, UnsupportedArchitecture,
                                  family_for)

__all__ = ["ArchView", "ArchFamily", "AttentionLayout", "FFNLayout", "FAMILIES", "UnsupportedArchitecture", "family_for"]


def get_submodule(root, dotted: str):
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


class ArchView:
    """``family`` is the description resolved for this model: the gated FFN layout when the
    config says so, and for multi-stack models (T5) the paths of one stack (``stack``; default the
    first). ``stacks()`` gives a view per stack, so operators only ever see one stack.

    A model without a config (a plain nn.Sequential) gets the MLP view: ``ArchView.of(model)``
    or ``ArchView(None, model)`` return an ``engine.arch.mlp.MLPView``."""

    def __new__(cls, config=None, model=None, stack: str | None = None):
        if cls is ArchView and config is None and model is not None:
            from engine.arch.mlp import MLPView

            return super().__new__(MLPView)  # Python then runs MLPView.__init__
        return super().__new__(cls)

    @classmethod
    def of(cls, model) -> "ArchView":
        """The view of a live model: its config's family, or the MLP view without a config."""
        return ArchView(getattr(model, "config", None), model)

    def __init__(self, config, model=None, stack: str | None = None):
        self.config = config
        self.model = model
        family = family_for(getattr(config, "model_type", type(config).__name__))
        self.base_family = family
        if family.gated_ffn is not None and getattr(config, family.gated_ffn_flag, False):
            family = replace(family, ffn=family.gated_ffn)
        self.stack = None
        if family.stacks:
            names = [s.name for s in family.stacks]
            if stack is not None and stack not in names:
                raise ValueError(f"stack: {family.name} models have stacks {', '.join(names)} — got '{stack}'")
            chosen = next(s for s in family.stacks if s.name == (stack or names[0]))
            family = replace(family, blocks=chosen.blocks, num_layers_field=chosen.num_layers_field,
                             ffn=replace(family.ffn, module=chosen.ffn_module), extra_outputs=chosen.extra_outputs)
            self.stack = chosen.name
        elif stack is not None:
            raise ValueError(f"stack: {family.name} models have one stack of blocks — leave stack out")
        self.family = family

    def stacks(self, name: str | None = None) -> list["ArchView"]:
        """One view per stack (all, or the one named); single-stack models: this view."""
        if not self.base_family.stacks:
            if name is not None:
                ArchView(self.config, self.model, name)  # raises the clear error
            return [self]
        names = [name] if name is not None else [s.name for s in self.base_family.stacks]
        views = [ArchView(self.config, self.model, n) for n in names]
        for view in views:
            view.stage_index = getattr(self, "stage_index", None)
        return views

    def depth_followers(self) -> dict:
        """Config fields that must equal a stack's depth besides its depth field (T5:
        `decoder_layers`, by which generate() sizes the decoder's KV cache; without it, it uses
        num_layers, the encoder's depth, and fails on a deeper decoder)."""
        if self.model is None:
            return {}
        return {s.generation_cache_field: len(get_submodule(self.model, s.blocks))
                for s in self.base_family.stacks if s.generation_cache_field}

    def update_stack_configs(self, changes: dict) -> None:
        """Stack modules keeping their own config copy (T5Stack.config, read when the decoder
        builds its KV cache) get `changes` too, each with its own stack's depth."""
        if self.model is None:
            return
        for layout in self.base_family.stacks:
            if layout.config_copy is None:
                continue
            own = get_submodule(self.model, layout.config_copy)
            for key, value in changes.items():
                setattr(own, key, value)
            setattr(own, self.base_family.num_layers_field, len(get_submodule(self.model, layout.blocks)))

    # -- facts from the config ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(getattr(self.config, self.family.num_layers_field))

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.config, self.family.hidden_size_field))

    @property
    def ffn_size(self) -> int:
        value = getattr(self.config, self.family.ffn_size_field, None)
        if value is None and self.family.ffn_size_default == "4*hidden_size":
            return 4 * self.hidden_size
        return int(value)

    # -- the live model ----------------------------------------------------------------------
    def blocks(self):
        if self.model is None:
            raise RuntimeError("ArchView built from a config has no blocks")
        return get_submodule(self.model, self.family.blocks)

    def ffn(self, layer: int):
        return get_submodule(self.blocks()[layer], self.family.ffn.module)

    def set_ffn(self, layer: int, module) -> None:
        self._set_in_block(layer, self.family.ffn.module, module)

    def attention(self, layer: int):
        return get_submodule(self.blocks()[layer], self.family.attention.module)

    def set_attention(self, layer: int, module) -> None:
        self._set_in_block(layer, self.family.attention.module, module)

    def _set_in_block(self, layer: int, dotted: str, module) -> None:
        parent_path, _, name = dotted.rpartition(".")
        parent = get_submodule(self.blocks()[layer], parent_path) if parent_path else self.blocks()[layer]
        setattr(parent, name, module)

    @property
    def num_heads(self) -> int:
        return int(getattr(self.config, self.family.attention.num_heads_field))

    @property
    def num_kv_heads(self) -> int:
        field = self.family.attention.num_kv_heads_field
        value = getattr(self.config, field, None) if field else None
        return int(value) if value else self.num_heads

