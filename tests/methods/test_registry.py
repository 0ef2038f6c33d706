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


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_record_carries_its_facts(name: str) -> None:
    method = METHODS[name]
    assert method.footprint is not None, f"{name}: no footprint (seqedit validate's estimate)"
    assert method.quick_hparams, f"{name}: no quick_hparams for the tests"
    method.config_cls.model_validate(dict(method.quick_hparams))
    if method.testbed_hparams:
        method.config_cls.model_validate(dict(method.testbed_hparams))
    assert method.batched == (method.edit_batch is not None)


def test_hparams_import_facts_name_each_method_once() -> None:
    imports = {n: m.hparams_import for n, m in METHODS.items() if m.hparams_import}
    path_names = [p.lower() for how in imports.values() for p in how.path_names]
    assert len(path_names) == len(set(path_names)), "a path name claimed by two methods"
    by_alg: dict[str, list[tuple[str, str] | None]] = {}
    for how in imports.values():
        if how.easyedit_alg is not None:
            by_alg.setdefault(how.easyedit_alg, []).append(how.selector)
    for alg, selectors in by_alg.items():
        if len(selectors) > 1:  # methods sharing an alg_name: one selector field, its values
            assert all(s is not None for s in selectors), alg
            assert len({s[0] for s in selectors if s}) == 1, alg
            assert len({s[1] for s in selectors if s}) == len(selectors), alg
