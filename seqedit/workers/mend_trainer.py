"""One data-parallel worker's share of training MEND: a plain class, no Ray.

Every step takes the same global batch of `batch_size` training requests on every worker
and works on its share of it (`trainer_common`: batches, shares, collectives):
1. the per-token factors (u, delta) of its requests on the base model;
2. their moments, gathered from all workers in rank order and merged, then added to the
   standardisers: every worker holds the same statistics;
3. MEND's loss of its requests, divided by the global batch size, and its gradient;
4. the gradients summed over workers, then one Adam step (the network at `lr`, the edit
   rates at `lr_lr`, as the reference trains them).
So one worker and N workers at the same global batch take the same steps, to float
rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import module_names_for
from seqedit.methods.mend import (
    EditExample,
    MendEditor,
    MendNetworkConfig,
    Moments,
    default_mend_modules,
    token_factors,
    weight_shapes,
)
from seqedit.methods.mend_loss import MendLossConfig, mend_loss
from seqedit.schemas.requests import EditRequest
from seqedit.workers.trainer_common import (
    Collectives,
    LocalCollectives,
    add_metrics,
    batch_means,
    global_batch,
    my_share,
    sum_gradients,
)


class MendTrainingConfig(BaseModel):
    """How MEND is trained (`seqedit train mend`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    network: MendNetworkConfig = Field(default_factory=MendNetworkConfig)
    loss: MendLossConfig = Field(default_factory=MendLossConfig)
    modules: list[str] | None = Field(
        default=None,
        description="Edited maps (dotted names); None: MLP in/out of the last 3 blocks.",
    )
    last_blocks: int = Field(default=3, ge=1, description="Blocks edited when `modules` is None.")
    lr: float = Field(default=1e-4, gt=0, description="Adam learning rate of the network.")
    lr_lr: float = Field(default=1e-4, gt=0, description="Adam learning rate of the edit rates.")
    batch_size: int = Field(default=8, ge=1, description="Global batch (all workers together).")
    max_steps: int = Field(default=1000, ge=1)
    val_every: int = Field(default=100, ge=1, description="Steps between validations.")
    val_size: int | None = Field(default=None, ge=1, description="Validation requests (None: all).")
    seed: int = 0


def build_editor(model: PreTrainedModel, config: MendTrainingConfig) -> MendEditor:
    """A fresh, untrained MEND for `model`'s edited maps."""
    names = module_names_for(model)
    modules = config.modules or default_mend_modules(
        names, model.config.num_hidden_layers, config.last_blocks
    )
    shapes = weight_shapes(model, modules, names.rewrite_weight_transposed)
    return MendEditor(modules, shapes, config.network)


class MendTrainer:
    """One worker's training state: the editor, its optimiser and the step count."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: MendTrainingConfig,
        train: Sequence[EditRequest],
        collectives: Collectives | None = None,
    ) -> None:
        if not train:
            raise ValueError("MEND training needs at least one training request")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.train = list(train)
        self.comm = collectives or LocalCollectives()
        self.transposed = module_names_for(model).rewrite_weight_transposed
        with torch.random.fork_rng():  # the same initialisation on every worker
            torch.manual_seed(config.seed)
            self.editor = build_editor(model, config)
        self.optimiser = torch.optim.Adam(
            [
                {"params": [p for n, p in self.editor.named_parameters() if n != "edit_lrs"]},
                {"params": [self.editor.edit_lrs], "lr": config.lr_lr},
            ],
            lr=config.lr,
        )
        self.step = 0

    def batch(self, step: int) -> list[EditRequest]:
        """The global batch of `step` (`trainer_common.global_batch`)."""
        return global_batch(self.train, step, self.config.batch_size, self.config.seed)

    def _mine(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        return my_share(requests, self.comm)

    def train_step(self) -> dict[str, float]:
        """One optimiser step on the global batch; returns its metrics (batch means)."""
        self.editor.train()
        global_batch = self.batch(self.step)
        mine = self._mine(global_batch)
        device = next(self.model.parameters()).device
        factors = [
            token_factors(
                self.model, EditExample.of(self.tokenizer, r, device), self.editor.modules_edited
            )
            for r in mine
        ]
        local: dict[str, Moments] = {}
        for request_factors in factors:
            for key, value in self.editor.moments(request_factors).items():
                local[key] = local.get(key, Moments(0, value.mean, value.sq_dev)).merged(value)
        merged: dict[str, Moments] = {}
        for worker in self.comm.gather(local):  # rank order: the same merge on every worker
            for key, value in worker.items():
                merged[key] = merged.get(key, Moments(0, value.mean, value.sq_dev)).merged(value)
        self.editor.add_moments(merged)

        self.optimiser.zero_grad(set_to_none=False)
        sums: dict[str, float] = {}
        for request, request_factors in zip(mine, factors, strict=True):
            loss, metrics = mend_loss(
                self.model, self.tokenizer, request, self.editor, self.config.loss,
                transposed=self.transposed, factors=request_factors,
            )  # fmt: skip
            (loss / len(global_batch)).backward()
            add_metrics(sums, metrics)
        sum_gradients(self.editor.parameters(), self.comm)
        self.optimiser.step()
        self.step += 1
        metrics = batch_means(sums, len(global_batch), self.comm)
        for i, rate in enumerate(self.editor.edit_lrs.detach().tolist()):
            metrics[f"lr/edit.{i}"] = rate
        return metrics

    @torch.no_grad()
    def validate(self, requests: Sequence[EditRequest]) -> dict[str, float]:
        """Metrics of `requests` (batch means) under the current editor, split over workers."""
        self.editor.eval()
        sums: dict[str, float] = {}
        device = next(self.model.parameters()).device
        for request in self._mine(requests):
            example = EditExample.of(self.tokenizer, request, device)
            factors = token_factors(self.model, example, self.editor.modules_edited)
            _, metrics = mend_loss(
                self.model, self.tokenizer, request, self.editor, self.config.loss,
                transposed=self.transposed, factors=factors,
            )  # fmt: skip
            add_metrics(sums, metrics)
        return batch_means(sums, len(requests), self.comm)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: the editor, the optimiser and the step."""
        return {
            "editor": self.editor.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.editor.load_state_dict(state["editor"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.step = int(state["step"])

    def parts(self) -> dict[str, Any]:
        """`best/editor.pt`: the network, the maps it edits, their shapes, its shape."""
        return {
            "editor": self.editor.state_dict(),
            "modules": self.editor.modules_edited,
            "shapes": self.editor.shapes,
            "network": self.config.network.model_dump(),
        }
