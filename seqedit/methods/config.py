"""What every method config shares: module names by hand, and validation with did-you-mean.

Each method's config subclasses `MethodConfig` (frozen, extra="forbid"), so a misspelled
hparam is an error, and `validate_config` turns that error into "did you mean ...".
"""

from __future__ import annotations

import difflib
import math
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from seqedit.errors import SeqeditError
from seqedit.methods.arch import ModuleNames, module_names_for


class MethodConfig(BaseModel):
    """Base of every method's hyperparameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step_budget_fields: ClassVar[tuple[str, ...]] = ()
    """Fields that bound the optimisation's steps; a health retry raises them."""

    module_names: ModuleNames | None = Field(
        default=None,
        description="Module names given by hand, for an architecture seqedit does not know "
        "(or to override the known ones); default: chosen by the model's `model_type`.",
    )


class ValueSearchOptions(MethodConfig):
    """seqedit's options of the value (v / z) optimisation shared by ROME, MEMIT, AlphaEdit."""

    step_budget_fields: ClassVar[tuple[str, ...]] = ("v_num_grad_steps",)

    early_stop_top1: bool = Field(
        default=False,
        description="Also stop the value optimisation once target_new is the top-1 token at "
        "every target position of every rewriting prompt (seqedit's speed option, off in the "
        "reference): the edit already succeeds there, with fewer steps and a smaller shift.",
    )
    value_batch_rows: int = Field(
        default=512,
        ge=1,
        description="A batch's value searches (MEMIT, AlphaEdit) share forward passes, up "
        "to this many prompt rows at a time (rewriting and KL prompts of each request); "
        "each search keeps its own delta, optimiser and stop. Lower it if memory is short.",
    )
    reuse_lower_layers: bool = Field(
        default=True,
        description="Run the blocks below the edit once per edit instead of at every "
        "optimisation step (their output cannot change); same result, faster. False runs "
        "them every step, as the reference does.",
    )


def names_for(model: nn.Module, config: MethodConfig) -> ModuleNames:
    """The module names a config edits in `model`: its own, else by `model_type`."""
    return config.module_names or module_names_for(model)


C = TypeVar("C", bound=BaseModel)
M = TypeVar("M", bound=MethodConfig)


def with_step_budget(config: M, factor: float) -> M:
    """`config` with every `step_budget_fields` value multiplied by `factor`, rounded up
    (a config without such fields comes back unchanged)."""
    update = {f: math.ceil(getattr(config, f) * factor) for f in config.step_budget_fields}
    return config.model_copy(update=update)


class HparamsError(SeqeditError, ValueError):
    """Hyperparameters that do not validate, with a did-you-mean for unknown fields."""


def _fields(cls: type[BaseModel]) -> list[str]:
    return list(cls.model_fields)


def validate_config(cls: type[C], hparams: dict[str, Any], *, where: str) -> C:
    """`cls.model_validate(hparams)`, with every problem listed on one error.

    `where` names the source ("method 'rome' hparams in spec.yaml"). An unknown field is
    answered with the closest known names.
    """
    try:
        return cls.model_validate(hparams)
    except ValidationError as exc:
        known = _fields(cls)
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "(root)"
            if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
                close = difflib.get_close_matches(str(error["loc"][0]), known, n=2, cutoff=0.6)
                hint = f" — did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                lines.append(f"  {field}: unknown hparam{hint}")
            else:
                lines.append(f"  {field}: {error['msg']}")
        raise HparamsError(
            f"{where}: {len(lines)} problem(s)\n" + "\n".join(lines) + f"\n  known hparams: "
            f"{', '.join(known)}"
        ) from None
