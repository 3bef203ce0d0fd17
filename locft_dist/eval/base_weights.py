"""The edited tensors' unedited values, swapped into the model for a moment: the unedited model without a
second copy of it.

Editing changes a few tensors, so the unedited model is the edited one with those tensors' old values in
place. Paired decoding (``generate.decode_pair``) runs each locality probe's unedited generation beside
the edited one and stops both where they part, instead of decoding the unedited model to the end of
every probe before training. Swapping exchanges the parameters' storage (no copy), so it costs nothing
per decoding step. One process only: a sharded parameter's storage is not the whole tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


class BaseWeights:
    """Snapshot of ``names``' current values in ``model``; ``swapped()`` puts them back for its duration."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        parameters = dict(model.named_parameters())
        missing = [n for n in names if n not in parameters]
        if missing:
            raise KeyError(f"the model has no parameters named {missing}")
        self.model = model
        self.names = list(names)
        with torch.no_grad():
            self.values: Mapping[str, torch.Tensor] = {n: parameters[n].detach().clone() for n in names}

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the model holds the snapshot; its own values come back after it."""
        parameters = dict(self.model.named_parameters())
        held: dict[str, torch.Tensor] = {}
        try:
            for name in self.names:
                param, base = parameters[name], self.values[name]
                if param.shape != base.shape or param.dtype != base.dtype or param.device != base.device:
                    raise ValueError(f"{name} changed shape, dtype or device since its snapshot")
                held[name] = param.data
                param.data = base
            yield
        finally:
            for name, value in held.items():
                parameters[name].data = value
