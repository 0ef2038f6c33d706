"""Our MEMIT reproduces the original reference implementation on the golden set.

One batch of all golden requests is edited at the golden layers, as the reference
`apply_memit_to_model` did; z, the first layer's keys, the factors (adj_k, resid) and the
dense delta of every edited parameter must match `memit_result.safetensors` within 1e-3 of
their largest entry. Everything is read from the golden directory (SEQEDIT_GOLDEN_DIR).
The update is solved in float64 (as in the reference), so the thread count hardly matters;
the test runs on one thread.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from seqedit.methods.arch import module_names_for, rewrite_weight
from seqedit.methods.memit import MemitConfig, memit_context_templates, memit_deltas
from tests.golden import (
    golden_moments,
    max_rel_error,
    reference_config,
    require_golden,
    torch_threads,
)

log = logging.getLogger(__name__)

REL_TOL = 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("stats", ["golden", "npz"])
def test_memit_matches_reference_batch(stats: str, tmp_path: Path) -> None:
    """`stats`: the golden covariance, or its reference .npz caches imported."""
    golden = require_golden()
    torch.manual_seed(0)
    hparams = golden.hparams("memit")
    model, tokenizer = golden.model()
    names = module_names_for(model)
    assert names.rewrite_module_tmp == hparams["rewrite_module_tmp"]
    assert names.layer_module_tmp == hparams["layer_module_tmp"]
    config = reference_config(
        MemitConfig, hparams, context_templates=golden.context_templates("memit")
    )
    reference = golden.result("memit")
    modules = {layer: names.rewrite_module_tmp.format(layer) for layer in config.layers}
    assert golden.delta_params("memit") == sorted(f"{m}.weight" for m in modules.values())
    originals = {}
    for layer, module in modules.items():
        originals[layer] = rewrite_weight(model, names, layer).detach().clone()
        assert torch.equal(originals[layer], reference[f"W0.{module}.weight"])
    by_module = golden_moments(golden, list(modules.values()), stats, tmp_path)
    moments = {layer: by_module[module] for layer, module in modules.items()}
    requests = golden.requests()

    with torch_threads(1):
        templates = memit_context_templates(model, tokenizer, config)
        result = memit_deltas(
            model, tokenizer, requests, config, second_moments=moments, context_templates=templates
        )

    for layer in config.layers:  # the function leaves the model unchanged
        assert torch.equal(rewrite_weight(model, names, layer), originals[layer])
    errors = {"z": max_rel_error(result.value, reference["z"])}
    first = f"ks.layer{config.layers[0]}"
    if first in reference:
        errors[first] = max_rel_error(result.key, reference[first])
    assert [d.module for d in result.updates] == list(modules.values())
    for delta in result.updates:
        param = f"{delta.module}.weight"
        assert delta.rank == len(requests)
        errors[f"adj_k.{param}"] = max_rel_error(delta.right, reference[f"adj_k.{param}"])
        errors[f"resid.{param}"] = max_rel_error(delta.left, reference[f"resid.{param}"])
        # storage layout (Conv1D): delta = (resid @ adj_k.T).T
        dense = delta.dense().T if names.rewrite_weight_transposed else delta.dense()
        errors[f"delta.{param}"] = max_rel_error(dense, reference[f"delta.{param}"])
    log.info("MEMIT golden relative errors: %s", errors)
    worst = {k: v for k, v in errors.items() if v > REL_TOL}
    assert not worst, f"relative errors above {REL_TOL}: {worst} (all: {errors})"
