"""What the editor needs to know about an editing method, in one small record.

A method module defines its pydantic config and one `EditMethod` value; the registry lists
them. No inheritance: the editor calls the functions held here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.delta import EditResult
from seqedit.schemas.requests import EditRequest

Prepare = Callable[
    [PreTrainedModel, PreTrainedTokenizerBase, Any, dict[int, torch.Tensor] | None], Any
]
"""(model, tokenizer, config, second moments by layer or None) -> per-campaign context."""

Edit = Callable[[PreTrainedModel, PreTrainedTokenizerBase, EditRequest, Any, Any], EditResult]
"""(model, tokenizer, request, config, context) -> the deltas of one edit (model untouched)."""


BatchEdit = Callable[
    [PreTrainedModel, PreTrainedTokenizerBase, list[EditRequest], Any, Any], EditResult
]
"""(model, tokenizer, requests, config, context) -> the deltas of one batch of edits."""


SequentialState = dict[str, torch.Tensor]
"""What a method carries from one edit to the next, by name (e.g. AlphaEdit's "cache_c.5")."""


def no_state(_context: Any) -> SequentialState:
    """The sequential state of a method that carries none."""
    return {}


def load_no_state(_context: Any, state: SequentialState) -> None:
    """Restore the (empty) state of a stateless method; anything else is a mistake."""
    if state:
        raise ValueError(f"this method carries no sequential state, got {sorted(state)}")


def one_at_a_time(batch: BatchEdit) -> Edit:
    """The `Edit` of a batched method: a batch of one, with key and value of that request.

    The batch result holds keys (n, d_in) and values (n, d); the single edit's are row 0.
    """

    def edit(
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        request: EditRequest,
        config: Any,
        context: Any,
    ) -> EditResult:
        result = batch(model, tokenizer, [request], config, context)
        result.key, result.value = result.key[0], result.value[0]
        return result

    return edit


@dataclass(frozen=True)
class EditMethod:
    """One registered editing method.

    Attributes:
        name: registry key ("rome").
        version: bumped whenever the math changes; recorded in every edit row.
        config_cls: pydantic config (extra="forbid") validated from the campaign's hparams.
        layers: the layers whose rewrite module a config edits.
        uses_second_moment: whether a config needs covariance statistics.
        prepare: work done once per campaign (context templates, inverse covariances).
        edit: compute the deltas of one request.
        state: the sequential state in a context (copies), for checkpoints.
        load_state: put a saved sequential state back into a context.
    """

    name: str
    version: str
    config_cls: type[BaseModel]
    layers: Callable[[Any], list[int]]
    uses_second_moment: Callable[[Any], bool]
    prepare: Prepare
    edit: Edit
    state: Callable[[Any], SequentialState] = no_state
    load_state: Callable[[Any, SequentialState], None] = load_no_state
