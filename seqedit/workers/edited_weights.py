"""The edited modules of one model, with fp32 master copies and the base weights.

Shared by the editor (which computes edits) and the evaluators (which replay them from the
edit log): both apply a delta the same way, so on CPU they hold bit-identical weights after
the same steps. Every delta is added to the fp32 master and the master is copied into the
model, so small updates are not rounded away in low precision over thousands of edits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from seqedit.methods.arch import ModuleNames, rewrite_weight
from seqedit.methods.delta import LowRankDelta, apply_delta_


def edited_weights(model: nn.Module, names: ModuleNames, layers: Sequence[int]) -> EditedWeights:
    """The `EditedWeights` of the rewrite module of each of `layers` in `model`."""
    params = {
        names.rewrite_module_tmp.format(layer): rewrite_weight(model, names, layer)
        for layer in layers
    }
    return EditedWeights(params, transposed=names.rewrite_weight_transposed)


class EditedWeights:
    """The weights of the edited modules (by module name) of a loaded model.

    Args:
        params: module name -> the model's weight parameter, in its storage layout
            ((d_in, d_out) for GPT-2's Conv1D, (d_out, d_in) for nn.Linear).
        transposed: whether the storage layout is the transpose of y = W x.
    """

    def __init__(self, params: dict[str, torch.Tensor], *, transposed: bool) -> None:
        self.params = params
        self.transposed = transposed
        self.masters = {name: w.detach().float().clone() for name, w in params.items()}
        self.base = {name: m.clone() for name, m in self.masters.items()}
        self.base_norms = {name: float(m.norm()) for name, m in self.base.items()}

    def apply(self, delta: LowRankDelta) -> None:
        """Add `delta` to its module's master and copy the master into the model."""
        if delta.module not in self.masters:
            raise ValueError(f"delta for module {delta.module!r}; edited here: {self.names()}")
        master = self.masters[delta.module]
        apply_delta_(master, delta, transposed=self.transposed)
        self._sync(delta.module)

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Set every master (and the model) to `weights` (copies), one tensor per module."""
        if set(weights) != set(self.masters):
            raise ValueError(f"weights for modules {sorted(weights)}, edited: {self.names()}")
        for name, weight in weights.items():
            self.masters[name] = weight.to(self.masters[name]).clone()
            self._sync(name)

    def reset(self) -> None:
        """Back to the base model's weights."""
        self.load(self.base)

    def copies(self) -> dict[str, torch.Tensor]:
        """Copies of the fp32 masters, by module name."""
        return {name: m.clone() for name, m in self.masters.items()}

    def names(self) -> list[str]:
        """The edited module names, sorted."""
        return sorted(self.masters)

    def layer_drifts(self) -> dict[str, float]:
        """||W_t - W_0||_F / ||W_0||_F of each edited module, by module name."""
        return {
            name: float((self.masters[name] - self.base[name]).norm()) / self.base_norms[name]
            for name in self.names()
        }

    def fingerprint(self) -> str:
        """sha256 of the fp32 masters of every edited module (bit-exact comparisons)."""
        digest = hashlib.sha256()
        for name in self.names():
            digest.update(name.encode())
            digest.update(self.masters[name].detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _sync(self, name: str) -> None:
        with torch.no_grad():
            self.params[name].copy_(self.masters[name].to(self.params[name].dtype))
