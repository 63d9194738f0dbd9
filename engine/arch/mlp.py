"""The architecture view of a plain ``nn.Sequential`` MLP (the small experiments' models).

Hidden layer i is the output of the i-th ``nn.Linear`` child, read by the (i+1)-th through
elementwise modules (activations, dropout). Operators reach Linears by that index.
"""

from __future__ import annotations

from types import SimpleNamespace

from torch import nn

MLP_FAMILY = SimpleNamespace(name="mlp", kind="mlp", model_types=("sequential",))


class MLPView:
    family = MLP_FAMILY

    def __init__(self, model: nn.Sequential):
        if not isinstance(model, nn.Sequential):
            raise TypeError(f"an MLP view needs an nn.Sequential, got {type(model).__name__}")
        self.model = model
        self.config = SimpleNamespace(model_type="sequential")

    def _positions(self) -> list[int]:
        """Indices in the Sequential of its Linear children (or modules standing for one)."""
        return [i for i, m in enumerate(self.model) if isinstance(m, nn.Linear) or hasattr(m, "materialize")]

    @property
    def num_linears(self) -> int:
        return len(self._positions())

    @property
    def num_layers(self) -> int:
        """Hidden layers: one between each pair of consecutive Linears."""
        return self.num_linears - 1

    def linear(self, index: int) -> nn.Module:
        return self.model[self._positions()[index]]

    def set_linear(self, index: int, module: nn.Module) -> None:
        self.model[self._positions()[index]] = module
