"""One data-parallel worker's share of training SERAC: a plain class, no Ray.

SERAC trains two parts beside the frozen base model (`methods/serac_loss`): the scope
classifier (over the base model's token embeddings) and the counterfactual model, a small
LM with the base model's tokenizer: a copy of the base model by default, or any local HF
model directory with the same vocabulary (`counterfactual:`). Batches, shares and
collectives as MEND's (`trainer_common`): one worker and N at the same global batch take
the same steps, to float rounding. The counterfactual model trains in eval mode (no
dropout, as the reference's `dropout: 0`): dropout's draws would differ between 1 and N
workers.

Counterfactual targets: with probability `swap_targets` a training request's target_new is
replaced by the target of another request of the batch, so the counterfactual model learns
to answer from the edit it reads, not from facts it memorised (a test edit's target is
new to it).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.serac_loss import SeracLossConfig, serac_loss
from seqedit.methods.serac_scope import ScopeClassifier, ScopeConfig, separator_ids
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


class SeracTrainingConfig(BaseModel):
    """How SERAC is trained (`seqedit train serac`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scope: ScopeConfig = Field(default_factory=ScopeConfig)
    loss: SeracLossConfig = Field(default_factory=SeracLossConfig)
    counterfactual: str | None = Field(
        default=None,
        description="HF model directory of the counterfactual model to start from (the "
        "base model's tokenizer); None: a copy of the base model.",
    )
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate of the classifier.")
    cf_lr: float = Field(
        default=1e-4, gt=0, description="Adam learning rate of the counterfactual model."
    )
    swap_targets: float = Field(
        default=0.5, ge=0, le=1, description="Share of training edits given another target."
    )
    batch_size: int = Field(default=8, ge=1, description="Global batch (all workers together).")
    max_steps: int = Field(default=1000, ge=1)
    val_every: int = Field(default=100, ge=1, description="Steps between validations.")
    val_size: int | None = Field(default=None, ge=1, description="Validation requests (None: all).")
    seed: int = 0


class SeracTrainer:
    """One worker's training state: the classifier, the counterfactual model, the optimiser.

    Args:
        model, tokenizer: the base model (frozen) and its tokenizer.
        config: `SeracTrainingConfig`.
        train: the training requests.
        collectives: how workers sum gradients (None: a single worker).
        counterfactual: the counterfactual model to start from (None: a copy of `model`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: SeracTrainingConfig,
        train: Sequence[EditRequest],
        collectives: Collectives | None = None,
        counterfactual: PreTrainedModel | None = None,
    ) -> None:
        if len(train) < 2:
            raise ValueError("SERAC training needs at least two training requests")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.train = list(train)
        self.comm = collectives or LocalCollectives()
        for param in model.parameters():
            param.requires_grad_(False)
        if counterfactual is not None:
            vocabulary = len(counterfactual.get_input_embeddings().weight)
            if vocabulary < len(tokenizer):
                raise ValueError(
                    f"the counterfactual model has {vocabulary} token embeddings, fewer than "
                    f"the base model's tokenizer ({len(tokenizer)}): it needs that tokenizer"
                )
        self.counterfactual = copy.deepcopy(model) if counterfactual is None else counterfactual
        self.counterfactual.to(next(model.parameters()).device).eval()
        for param in self.counterfactual.parameters():
            param.requires_grad_(True)
        d_model = int(model.get_input_embeddings().weight.shape[1])
        with torch.random.fork_rng(devices=[]):  # the same initialisation on every worker
            torch.manual_seed(config.seed)
            self.classifier = ScopeClassifier(d_model, config.scope).to(
                next(model.parameters()).device
            )
        self.separator = separator_ids(tokenizer)
        self.optimiser = torch.optim.Adam(
            [
                {"params": list(self.classifier.parameters())},
                {"params": list(self.counterfactual.parameters()), "lr": config.cf_lr},
            ],
            lr=config.lr,
        )
        self.step = 0

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [*self.classifier.parameters(), *self.counterfactual.parameters()]

    def _swapped(self, batch: list[EditRequest], step: int) -> list[EditRequest]:
        """The batch with some targets swapped for other requests' (seeded by step)."""
        rng = random.Random(self.config.seed * 7_919 + step)
        out = []
        for i, request in enumerate(batch):
            others = [r.target_new for j, r in enumerate(batch) if j != i]
            if others and rng.random() < self.config.swap_targets:
                request = request.model_copy(update={"target_new": rng.choice(others)})
            out.append(request)
        return out

    @staticmethod
    def _others(batch: Sequence[EditRequest], i: int) -> list[str]:
        """Prompts of the other requests of a batch about other subjects (easy negatives)."""
        return [r.filled_prompt for r in batch if r.subject != batch[i].subject]

    def train_step(self) -> dict[str, float]:
        """One optimiser step on the global batch; its metrics (batch means)."""
        self.classifier.train()
        self.counterfactual.eval()  # no dropout (the reference trains at dropout 0 too):
        batch = self._swapped(  # N workers then take one worker's steps
            global_batch(self.train, self.step, self.config.batch_size, self.config.seed),
            self.step,
        )
        indices = my_share(range(len(batch)), self.comm)
        self.optimiser.zero_grad(set_to_none=False)
        sums: dict[str, float] = {}
        for i in indices:
            loss, metrics = serac_loss(
                self.model, self.counterfactual, self.classifier, self.tokenizer, batch[i],
                self._others(batch, i), self.separator, self.config.loss,
            )  # fmt: skip
            (loss / len(batch)).backward()
            add_metrics(sums, metrics)
        sum_gradients(self._parameters(), self.comm)
        self.optimiser.step()
        self.step += 1
        metrics = batch_means(sums, len(batch), self.comm)
        metrics["lr/classifier"] = self.config.lr
        metrics["lr/counterfactual"] = self.config.cf_lr
        return metrics

    @torch.no_grad()
    def validate(self, requests: Sequence[EditRequest]) -> dict[str, float]:
        """Metrics of `requests` (no target swapped), split over workers; each request's
        easy negatives are the prompts of the other validation requests."""
        self.classifier.eval()
        self.counterfactual.eval()
        requests = list(requests)
        sums: dict[str, float] = {}
        for i in my_share(range(len(requests)), self.comm):
            _, metrics = serac_loss(
                self.model, self.counterfactual, self.classifier, self.tokenizer, requests[i],
                self._others(requests, i), self.separator, self.config.loss,
            )  # fmt: skip
            add_metrics(sums, metrics)
        return batch_means(sums, len(requests), self.comm)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: both parts, the optimiser and the step."""
        return {
            "classifier": self.classifier.state_dict(),
            "counterfactual": self.counterfactual.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classifier.load_state_dict(state["classifier"])
        self.counterfactual.load_state_dict(state["counterfactual"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.step = int(state["step"])

    def parts(self) -> dict[str, Any]:
        """`best/editor.pt`: the classifier, the counterfactual model and its config."""
        return {
            "classifier": self.classifier.state_dict(),
            "counterfactual": self.counterfactual.state_dict(),
            "counterfactual_config": self.counterfactual.config.to_dict(),
            "network": self.config.scope.model_dump(),
        }
