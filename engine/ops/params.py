"""Parameters of each expansion operator, as pydantic models.

This is the single place that says which keys an ``[[stages.expand]]`` table may hold for each
``op``. It imports no torch, so the plan checker, the CLI and the TUI can use it cheaply; the
implementations (``engine/ops/*.py``) register against these names.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LayerSelection = Union[Literal["all"], list[int]]


class OpParams(BaseModel):
    """Keys shared by every operator."""

    model_config = ConfigDict(extra="forbid")

    op: str

    def layer_indices(self, num_layers: int) -> list[int]:
        """The chosen layers, resolved against the model's depth."""
        layers = getattr(self, "layers", "all")
        return list(range(num_layers)) if layers == "all" else list(layers)

    def num_layers_after(self, num_layers: int) -> int:
        """Depth of the model after this operator (width operators keep it)."""
        return num_layers


class LayeredOpParams(OpParams):
    layers: LayerSelection = Field("all", description='"all" or a list of block indices')

    @field_validator("layers")
    @classmethod
    def _non_negative(cls, v):
        if isinstance(v, list):
            bad = [i for i in v if i < 0]
            if bad:
                raise ValueError(f"layer indices must be >= 0, got {bad}")
            if len(set(v)) != len(v):
                raise ValueError(f"layer indices repeat: {v}")
        return v


WidthInit = Literal["zero_out", "net2net", "copy_halve", "zeros", "constant", "random"]


class WidenFFNParams(LayeredOpParams):
    """Add `size` hidden units to the feed-forward network of each chosen block."""

    op: Literal["widen_ffn"] = "widen_ffn"
    size: int = Field(..., gt=0, description="number of hidden units to add per layer")
    init: WidthInit = "zero_out"
    mode: Literal["parallel", "inplace"] = "parallel"
    noise: float = Field(0.0, ge=0, description="relative noise added by net2net/copy_halve")
    init_std: float | None = Field(None, gt=0, description="std of random incoming weights "
                                   "(default: the std of the existing incoming weights)")
    value: float = Field(0.01, description="the weight used by init = constant")

    @model_validator(mode="after")
    def _splitting_needs_inplace(self):
        if self.init in ("net2net", "copy_halve") and self.mode == "parallel":
            raise ValueError(f"init = \"{self.init}\" rescales the original units' outgoing weights, "
                             "which a parallel path leaves untouched — set mode = \"inplace\"")
        return self


# op name -> parameter model. The plan checker rejects any op not listed here.
OP_PARAMS: dict[str, type[OpParams]] = {
    "widen_ffn": WidenFFNParams,
}
