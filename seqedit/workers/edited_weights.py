"""The edited modules of one model, with fp32 master copies and the base weights.

Shared by the editor (which computes edits) and the evaluators (which replay them from the
edit log): both apply an update the same way, so on CPU they hold bit-identical weights
after the same steps. Every update is added to the fp32 master and the master is copied
into the model, so small updates are not rounded away in low precision over thousands of
edits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from seqedit.methods.arch import ModuleNames, module_weight
from seqedit.methods.updates import WeightUpdate, apply_update_


def edited_weights(model: nn.Module, names: ModuleNames, modules: Sequence[str]) -> EditedWeights:
    """The `EditedWeights` of the linear maps `modules` of `model` (each `nn.Linear` or
    `Conv1D`; another module type takes `names.rewrite_weight_transposed`)."""
    params: dict[str, torch.Tensor] = {}
    transposed: dict[str, bool] = {}
    for name in modules:
        params[name], transposed[name] = module_weight(
            model, name, default_transposed=names.rewrite_weight_transposed
        )
    return EditedWeights(params, transposed=transposed)


class EditedWeights:
    """The weights of the edited modules (by module name) of a loaded model.

    Args:
        params: module name -> the model's weight parameter, in its storage layout
            ((d_in, d_out) for GPT-2's Conv1D, (d_out, d_in) for nn.Linear).
        transposed: module name -> whether its storage is the transpose of y = W x.
    """

    def __init__(self, params: dict[str, torch.Tensor], *, transposed: dict[str, bool]) -> None:
        self.params = params
        self.transposed = transposed
        self.masters = {name: w.detach().float().clone() for name, w in params.items()}
        self.base = {name: m.clone() for name, m in self.masters.items()}
        self.base_norms = {name: float(m.norm()) for name, m in self.base.items()}

    def apply(self, update: WeightUpdate) -> None:
        """Add `update` to its module's master and copy the master into the model."""
        if update.module not in self.masters:
            raise ValueError(f"update for module {update.module!r}; edited here: {self.names()}")
        master = self.masters[update.module]
        apply_update_(master, update, transposed=self.transposed[update.module])
        self._sync(update.module)

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
