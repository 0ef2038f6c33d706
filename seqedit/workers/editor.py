"""SequentialEditor: applies edits one after another to one model, and scores them.

A plain class (no Ray): the pipeline wraps it with `ray.remote`. The model's edited weights
have fp32 master copies; every delta is added to the master and the master is copied into
the model, so small updates are not rounded away in low precision over thousands of edits.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.errors import SeqeditError
from seqedit.methods.config import names_for, validate_config, with_step_budget
from seqedit.methods.locality import BaseMeasures
from seqedit.methods.method import jsonable
from seqedit.methods.registry import get_method, registered_methods
from seqedit.methods.scoring import score_targets
from seqedit.methods.updates import EditResult, MemoryEntry, Update, non_finite
from seqedit.schemas.requests import EditRequest
from seqedit.schemas.tables import EditRow, EvalRow, Protocol
from seqedit.workers.checkpoints import load_checkpoint, save_checkpoint
from seqedit.workers.derived_store import method_statistics
from seqedit.workers.edit_log import encode_edit_log, parse_edit_log
from seqedit.workers.edited_model import EditedModel, save_memory
from seqedit.workers.evaluator import evaluate_records
from seqedit.workers.model_io import load_model
from seqedit.workers.trained_parts import prepare_context

log = logging.getLogger(__name__)


_WEIGHT, _STATE, _RNG = "weight.", "state.", "rng_state"


class EditError(SeqeditError, RuntimeError):
    """An edit that produced an unusable update (NaN/Inf), naming the step and case."""


class SequentialEditor:
    """Owns one model and applies edit requests to it in order.

    Args:
        model_dir: local Hugging Face model directory (the base model); with `loaded`, only
            to check the stats' model fingerprint (None: not checked).
        method: registered method name ("rome", ...).
        hparams: the method's config fields.
        stats_dir: covariance stats directory, needed when the method uses second moments.
        campaign: campaign name, written into every row.
        seed: torch seed set once at start, so a campaign is deterministic on CPU.
        torch_threads: intra-op threads for this worker (None keeps the current setting).
        keep_undo: snapshot the edited weights and method state before every edit, so that
            `undo_last` can roll the edit back exactly (costs a copy of the edited weights).
        retry_factor: a retried edit's step budget is multiplied by this once per retry.
        loaded: (model, tokenizer) already loaded, edited in place instead of loading
            `model_dir` (the model should be in eval mode).
    """

    def __init__(
        self,
        model_dir: str | None,
        method: str,
        hparams: dict[str, Any],
        *,
        stats_dir: str | None,
        campaign: str,
        seed: int = 0,
        torch_threads: int | None = None,
        device: str = "cpu",
        keep_undo: bool = False,
        retry_factor: float = 2.0,
        loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
    ) -> None:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.seed, self.retry_factor = seed, retry_factor
        self.campaign = campaign
        self.method = get_method(method)
        self.config = validate_config(
            self.method.config_cls, hparams, where=f"{self.method.name} hparams"
        )
        if loaded is not None:  # a model already in memory (the Python API), edited in place
            self.model, self.tokenizer = loaded
        elif model_dir is None:
            raise ValueError("SequentialEditor needs a model directory or a loaded model")
        else:
            self.model, self.tokenizer = load_model(model_dir, device=device)
        self.names = names_for(self.model, self.config)
        self.layers: list[int] = self.method.layers(self.config)
        self.modules: list[str] = self.method.modules_in(self.model, self.config, self.names)
        self.second_moments, derived, self.derived_counts = method_statistics(
            self.method, self.config, self.names, model_dir=model_dir, stats_dir=stats_dir
        )
        self.context = prepare_context(
            self.method, self.model, self.tokenizer, self.config, model_dir,
            self.second_moments, derived,
        )  # fmt: skip
        self.edited = EditedModel(self.model, self.method, self.config, self.names, self.context)
        self.edit_log: list[tuple[int, list[Update]]] = []
        self.n_applied = 0  # edits (requests) applied
        self.n_steps = 0  # edit steps applied (a batch is one step)
        self.keep_undo = keep_undo
        self._undo: dict[str, torch.Tensor] | None = None
        self._base: BaseMeasures | None = None

    # --- editing -------------------------------------------------------------------------

    def _rewrite_probs(self, requests: Sequence[EditRequest]) -> list[tuple[float, float | None]]:
        """(P(new), P(true) or None) on each request's rewrite prompt, in one scoring call."""
        prompts: list[str] = []
        targets: list[str] = []
        for request in requests:
            for target in (request.target_new, request.target_true):
                if target is not None:
                    prompts.append(request.filled_prompt)
                    targets.append(target)
        scores = iter(score_targets(self.model, self.tokenizer, prompts, targets))
        return [
            (next(scores).prob, None if r.target_true is None else next(scores).prob)
            for r in requests
        ]

    def edit(self, request: EditRequest, step: int, *, retry: int = 0) -> EditRow:
        """Compute and apply one edit; return its row (probabilities before and after).
        `retry` k > 0 redoes a rolled-back edit: see `_retry_config`."""
        config = self._retry_config(retry)

        def compute() -> EditResult:
            return self.method.edit(self.model, self.tokenizer, request, config, self.context)

        return self._edit_step([request], step, compute, retry)[0]

    def edit_batch(
        self, requests: Sequence[EditRequest], step: int, *, retry: int = 0
    ) -> list[EditRow]:
        """Compute and apply one batched edit of all `requests` as step `step` (MEMIT,
        AlphaEdit); one row per request, sharing the step, the loss and the update norm."""
        batch_edit = self.method.edit_batch
        if batch_edit is None:
            batched = ", ".join(sorted(m.name for m in registered_methods().values() if m.batched))
            raise ValueError(
                f"method {self.method.name!r} edits one request at a time; apply the requests "
                f"sequentially (methods with batches: {batched})"
            )
        if not requests:
            raise ValueError("edit_batch needs at least one request")
        config = self._retry_config(retry)

        def compute() -> EditResult:
            return batch_edit(self.model, self.tokenizer, list(requests), config, self.context)

        return self._edit_step(requests, step, compute, retry)

    def _retry_config(self, retry: int) -> Any:
        """The config of try `retry` of an edit: the step budget times `retry_factor**retry`."""
        if retry == 0:
            return self.config
        return with_step_budget(self.config, self.retry_factor**retry)

    def _edit_step(
        self,
        requests: Sequence[EditRequest],
        step: int,
        compute: Callable[[], EditResult],
        retry: int,
    ) -> list[EditRow]:
        start = time.perf_counter()
        before = self._rewrite_probs(requests)
        snapshot_started = time.perf_counter()
        self._undo = self.checkpoint() if self.keep_undo else None
        check_seconds = time.perf_counter() - snapshot_started
        if retry:  # another seed for what the method draws; the campaign's stream is untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 1_000_003 * retry + step)
                result = compute()
        else:
            result = compute()
        bad = non_finite(result.updates)
        if bad is not None:
            cases = ", ".join(str(r.case_id) for r in requests)
            raise EditError(
                f"step {step} (case_id {cases}): the {bad} contains NaN/Inf; the model was "
                "left unchanged"
            )
        update_norm = 0.0
        for update in result.updates:
            if not isinstance(update, MemoryEntry):
                update_norm = math.hypot(update_norm, float(update.norm()))
        self.edited.apply(result.updates)
        self.edit_log.append((step, result.updates))
        self.n_applied += len(requests)
        self.n_steps += 1
        verify_started = time.perf_counter()
        after = self._rewrite_probs(requests)
        drift, done = self.weight_drift(), time.perf_counter()
        memory_size = self.edited.memory_size()
        seconds, check_seconds = done - start, check_seconds + done - verify_started
        return [
            EditRow(
                campaign=self.campaign,
                step=step,
                case_id=request.case_id,
                method=self.method.name,
                method_version=self.method.version,
                modules=",".join(self.modules),
                p_new_before=p_new_before,
                p_true_before=p_true_before,
                p_new_after=p_new_after,
                p_true_after=p_true_after,
                success=p_true_after is None or p_new_after > p_true_after,
                loss_initial=result.initial_loss,
                loss=result.loss,
                opt_steps=result.steps,
                update_norm=None if memory_size is not None else update_norm,
                weight_drift=drift,
                memory_size=memory_size,
                seconds=seconds / len(requests),
                check_seconds=check_seconds / len(requests),
                retries=retry,
            )
            for request, (p_new_before, p_true_before), (p_new_after, p_true_after) in zip(
                requests, before, after, strict=True
            )
        ]

    # --- inspection ----------------------------------------------------------------------

    def set_probes(self, prompts: Sequence[str], heldout: Sequence[str] = ()) -> None:
        """Fix the locality probe prompts and the held-out texts, and measure the base model
        on them (next-token distributions, perplexity). Call before any edit (the driver
        does, right after construction)."""
        if self.n_steps:
            raise ValueError("probes must be set on the base model, before any edit")
        self._base = BaseMeasures(self.model, self.tokenizer, prompts, heldout)

    def periodic_health(self, retention: Sequence[EditRequest]) -> dict[str, float]:
        """Measurements for the periodic health checks, on the model as it is now:
        `retention` (share of these earlier requests whose P(new) > P(true)), locality
        drift on the probes (`locality_kl`, `locality_top1`), held-out `perplexity` and
        its ratio to the base model's (`perplexity_ratio`), and `weight_drift.<module>`."""
        metrics: dict[str, float] = {}
        if retention:
            held = [true is None or new > true for new, true in self._rewrite_probs(retention)]
            metrics["retention"] = sum(held) / len(held)
        if self._base is not None:
            metrics.update(self._base.compare(self.model, self.tokenizer))
        metrics.update({f"weight_drift.{name}": d for name, d in self.layer_drifts().items()})
        memory_size = self.edited.memory_size()
        if memory_size is not None:
            metrics["memory_size"] = float(memory_size)
        probes = self._base.probes if self._base is not None else []
        metrics.update(self.edited.memory_probe(self.tokenizer, probes))
        return metrics

    def pid(self) -> int:
        """The operating-system process this editor runs in."""
        return os.getpid()

    def describe(self) -> dict[str, Any]:
        """What the campaign records about its method: name, version, validated config,
        edited modules and the per-campaign context (e.g. ROME's sampled templates)."""
        return {
            "method": self.method.name,
            "method_version": self.method.version,
            "config": self.config.model_dump(mode="json"),
            "modules": self.modules,
            "memory": self.edited.has_memory,
            "context": jsonable(self.context),
        }

    def layer_drifts(self) -> dict[str, float]:
        """||W_t - W_0||_F / ||W_0||_F of each edited module, by module name."""
        return self.edited.weights.layer_drifts()

    def weight_drift(self) -> float | None:
        """max over edited modules of ||W_t - W_0||_F / ||W_0||_F (None: no weights edited)."""
        return max(self.layer_drifts().values(), default=None)

    def weights_fingerprint(self) -> str:
        """sha256 of the fp32 masters of every edited module and of a method's memory
        (bit-exact comparisons)."""
        return self.edited.fingerprint()

    # --- sequential state: checkpoints and replay ------------------------------------------

    def checkpoint(self) -> dict[str, torch.Tensor]:
        """Everything the next edit depends on, as copies: the fp32 masters of the edited
        modules ("weight.<module>"), the method's sequential state ("state.<name>", e.g.
        AlphaEdit's accumulated K K^T, GRACE's codebook), the counts of edits and steps applied
        ("n_applied", "n_steps", (1,) each) and torch's CPU random state ("rng_state": what a
        method draws next, e.g. GRACE's cold value init, continues as in an uninterrupted run)."""
        tensors = {f"{_WEIGHT}{name}": m for name, m in self.edited.weights.copies().items()}
        for name, value in self.method.state(self.context).items():
            tensors[f"{_STATE}{name}"] = value
        tensors["n_applied"] = torch.tensor([self.n_applied], dtype=torch.int64)
        tensors["n_steps"] = torch.tensor([self.n_steps], dtype=torch.int64)
        tensors[_RNG] = torch.get_rng_state()
        return tensors

    def restore(self, checkpoint: dict[str, torch.Tensor]) -> None:
        """Put the editor back where `checkpoint()` was taken (same model and method)."""
        weights = {k[len(_WEIGHT) :]: v for k, v in checkpoint.items() if k.startswith(_WEIGHT)}
        if set(weights) != set(self.edited.weights.masters):
            raise ValueError(
                f"checkpoint holds modules {sorted(weights)}, this editor edits "
                f"{self.edited.weights.names()}"
            )
        state = {k[len(_STATE) :]: v for k, v in checkpoint.items() if k.startswith(_STATE)}
        self.method.load_state(self.context, state)
        self.edited.weights.load(weights)
        self.n_applied = int(checkpoint["n_applied"][0])
        self.n_steps = int(checkpoint["n_steps"][0])
        if _RNG in checkpoint:  # checkpoints written before edit contract v2 have none
            torch.set_rng_state(checkpoint[_RNG].to(torch.uint8))
        self.edit_log = []

    def undo_last(self, *, keep_step: bool = True) -> None:
        """Roll the last edit step back exactly (needs `keep_undo`). With `keep_step` the
        step stays in the edit log as rolled back (replay still sees every step); without,
        it is gone, so the same step can be tried again (a health retry)."""
        if self._undo is None:
            raise ValueError("nothing to undo: keep_undo is off, or the step was undone already")
        step, _ = self.edit_log[-1]
        log = [*self.edit_log[:-1], (step, [])] if keep_step else self.edit_log[:-1]
        self.restore(self._undo)
        self.edit_log, self._undo = log, None
        self.n_steps += keep_step  # the step was taken; it just changed nothing

    def save_model(self, out_dir: str | Path) -> None:
        """The edited model and its tokenizer as a Hugging Face model directory; a
        memory-based method's memory goes beside them (`edited_model.save_memory`)."""
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        if self.edited.has_memory:
            save_memory(self.edited, self.config, Path(out_dir))

    def save_checkpoint(self, path: str | Path) -> str:
        """`checkpoint()` to a file or storage URI, atomically; returns the weights
        fingerprint."""
        return save_checkpoint(self, path)

    def load_checkpoint(self, path: str | Path, expected_fingerprint: str | None = None) -> None:
        """Restore from a `save_checkpoint` file, verifying its weights fingerprint."""
        load_checkpoint(self, path, expected_fingerprint=expected_fingerprint)

    def replay(self, edit_log: dict[str, torch.Tensor], *, until_step: int | None = None) -> int:
        """Apply logged updates (`take_edit_log` tensors of one or more consecutive shards, any
        edit-log version) in step order, exactly as `edit` applied them: from the base model
        the fp32 masters and a method's memory come out bit for bit the same on CPU. The log
        must continue where this editor stands (its first step = `n_steps`, no gaps). With
        `until_step`, logged steps from `until_step` on are left out (the model as it was
        before that step). Other method state (AlphaEdit's cache_c) is not rebuilt
        (checkpoints hold it). Returns the number of steps applied."""
        steps = parse_edit_log(edit_log)
        if until_step is not None:
            steps = {step: deltas for step, deltas in steps.items() if step < until_step}
        expected = list(range(self.n_steps, self.n_steps + len(steps)))
        if sorted(steps) != expected:
            found = sorted(steps)
            raise ValueError(
                f"edit log holds steps {found[:3]}...{found[-3:]}, but this editor has "
                f"{self.n_steps} steps applied: replay needs steps {self.n_steps}.. "
                "with no gaps"
            )
        for _step, updates in sorted(steps.items()):
            self.edited.apply(updates)
            self.n_steps += 1
            self.n_applied += bool(updates)  # the log does not say how many requests a step had
        return len(steps)

    def take_edit_log(self) -> dict[str, torch.Tensor]:
        """The factors of the edits applied since the last call, keyed for safetensors."""
        tensors = encode_edit_log(self.edit_log)
        self.edit_log = []
        return tensors

    def edit_log_since(self, step: int) -> dict[str, torch.Tensor]:
        """The logged factors of steps `step`.. not yet taken (`take_edit_log` keys); the
        log stays as it is (evaluators read it while the shard runs on)."""
        return encode_edit_log([entry for entry in self.edit_log if entry[0] >= step])

    def evaluate(
        self,
        requests: Sequence[EditRequest],
        edit_steps: Sequence[int],
        *,
        protocol: Protocol,
        batch_size: int = 64,
    ) -> list[EvalRow]:
        """Score `requests` on the model as it is now (after `n_applied` edits)."""
        return evaluate_records(
            self.model,
            self.tokenizer,
            requests,
            edit_steps,
            campaign=self.campaign,
            protocol=protocol,
            n_edits_applied=self.n_applied,
            batch_size=batch_size,
        )
