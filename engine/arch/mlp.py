"""The architecture view of a plain ``nn.Sequential`` MLP (the small experiments' models).

Hidden layer i is the output of the i-th layer child (an ``nn.Linear``, or a module an operator
put in its place), read by the (i+1)-th through elementwise children (activations, dropout).
Which children are layers and which are elementwise is data: the "mlp" entry of
``engine.arch.families``. Operators reach Linears by index (``linear(i)`` / ``set_linear``).

Build it with ``ArchView.of(model)`` or ``ArchView(None, model)``: a model without a config is
an MLP.
"""

from __future__ import annotations

from torch import nn

from engine.arch import ArchView
from engine.arch.families import UnsupportedArchitecture, family_for

MLP_MODEL_TYPE = "sequential"
MLP_OPS_HINT = "an nn.Sequential MLP has no transformer blocks — grow it with widen_mlp, concat_linear or parallel_linear"


class MLPView(ArchView):
    def __init__(self, config=None, model=None, stack: str | None = None):
        if not isinstance(model, nn.Sequential):
            raise UnsupportedArchitecture(f"a model without a config must be a plain nn.Sequential MLP — got "
                                          f"{type(model).__name__}")
        if stack is not None:
            raise ValueError("stack: an nn.Sequential MLP has one stack of layers — leave stack out")
        self.config = config  # None: a Sequential has no config
        self.model = model
        self.family = self.base_family = family_for(MLP_MODEL_TYPE)
        self.stack = None

    # -- layers --------------------------------------------------------------------------------
    def _is_layer(self, module: nn.Module) -> bool:
        # a wrapper an operator put in a Linear's place computes one Linear (engine.ops.linear)
        return type(module).__name__ in self.family.layer_types or callable(getattr(module, "materialize", None))

    def _positions(self) -> list[int]:
        """Indices in the Sequential of its layer children."""
        return [i for i, m in enumerate(self.model) if self._is_layer(m)]

    @property
    def num_linears(self) -> int:
        return len(self._positions())

    @property
    def num_layers(self) -> int:
        """Hidden layers: one between each pair of consecutive Linears."""
        return max(self.num_linears - 1, 0)

    def linear(self, index: int) -> nn.Module:
        return self.model[self._positions()[index]]

    def set_linear(self, index: int, module: nn.Module) -> None:
        self.model[self._positions()[index]] = module

    def check_hidden_layer(self, layer: int, field: str = "layers") -> None:
        """ValueError unless hidden layer `layer` exists and reaches the next Linear through
        elementwise children only (so it can gain units)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"{field}: hidden layer {layer} out of range — this MLP has {self.num_layers} hidden "
                             f"layers (0..{self.num_layers - 1}; hidden layer i is the output of Linear i)")
        positions = self._positions()
        for child in range(positions[layer] + 1, positions[layer + 1]):
            name = type(self.model[child]).__name__
            if name not in self.family.elementwise_types:
                raise ValueError(f"{field}: hidden layer {layer} passes through {name} (child {child}) on its way "
                                 f"to Linear {layer + 1}; only elementwise modules ({', '.join(self.family.elementwise_types[:6])}, "
                                 "...) can take more units — choose another layer")

    # -- transformer facts an MLP does not have ------------------------------------------------
    def blocks(self):
        raise ValueError(MLP_OPS_HINT)

    def ffn(self, layer: int):
        raise ValueError(MLP_OPS_HINT)

    def attention(self, layer: int):
        raise ValueError(MLP_OPS_HINT)

    @property
    def hidden_size(self) -> int:
        raise ValueError(MLP_OPS_HINT)

    @property
    def ffn_size(self) -> int:
        raise ValueError(MLP_OPS_HINT)

    @property
    def num_heads(self) -> int:
        raise ValueError(MLP_OPS_HINT)
