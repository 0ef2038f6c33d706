"""The method registry: lookup with did-you-mean, and every method's record is complete."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from seqedit.methods.config import HparamsError, validate_config
from seqedit.methods.registry import METHODS, get_method


def test_unknown_method_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="did you mean 'rome'"):
        get_method("rmoe")


def test_lookup_is_case_insensitive() -> None:
    assert get_method("ROME").name == "rome"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_configs_forbid_unknown_fields(name: str) -> None:
    method = METHODS[name]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        method.config_cls.model_validate({"layer": 1, "not_a_field": 1})
    assert method.version


def test_unknown_hparam_suggests_the_closest_field() -> None:
    with pytest.raises(HparamsError) as info:
        validate_config(
            get_method("rome").config_cls,
            {"layer": 1, "v_lrr": 0.5, "clamp_norm_factor": -1},
            where="rome hparams in spec.yaml",
        )
    message = str(info.value)
    assert message.startswith("rome hparams in spec.yaml: 2 problem(s)")
    assert "v_lrr: unknown hparam — did you mean 'v_lr'?" in message
    assert "clamp_norm_factor: Input should be greater than 0" in message
