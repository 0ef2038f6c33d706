"""Our AlphaEdit reproduces the original reference implementation on the golden set.

The golden requests are edited one at a time in sequence (each delta applied before the next
edit, cache_c carried from edit to edit), as the reference `apply_AlphaEdit_to_model` was
called; the null-space projectors P, the final cache_c and the total delta of every edited
parameter must match `alphaedit_result.safetensors` within 1e-3 of their largest entry.
Everything is read from the golden directory (SEQEDIT_GOLDEN_DIR). P is computed with the
reference run's thread count (an SVD), the edits on one thread.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from seqedit.methods.alphaedit import AlphaEditConfig, alphaedit_deltas, null_space_projector
from seqedit.methods.arch import module_names_for, rewrite_weight
from seqedit.methods.memit import memit_context_templates
from seqedit.methods.updates import apply_update_
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
@pytest.mark.parametrize("stats", ["golden", "npz", "npz+projector"])
def test_alphaedit_matches_reference_sequential_edits(stats: str, tmp_path: Path) -> None:
    """`stats`: the golden covariance, or its reference .npz caches imported, or those and
    the reference's P saved as AlphaEdit saves it (`null_space_project.pt`), imported and
    loaded from the derived cache as a campaign does (no SVD of ours)."""
    golden = require_golden()
    torch.manual_seed(0)
    hparams = golden.hparams("alphaedit")
    model, tokenizer = golden.model()
    names = module_names_for(model)
    assert names.rewrite_module_tmp == hparams["rewrite_module_tmp"]
    assert names.layer_module_tmp == hparams["layer_module_tmp"]
    config = reference_config(
        AlphaEditConfig, hparams, context_templates=golden.context_templates("alphaedit")
    )
    reference = golden.result("alphaedit")
    modules = {layer: names.rewrite_module_tmp.format(layer) for layer in config.layers}
    assert golden.delta_params("alphaedit") == sorted(f"{m}.weight" for m in modules.values())
    weights = {layer: rewrite_weight(model, names, layer) for layer in config.layers}
    originals = {layer: w.detach().clone() for layer, w in weights.items()}
    for layer, module in modules.items():
        assert torch.equal(originals[layer], reference[f"W0.{module}.weight"])

    errors: dict[str, float] = {}
    moments = golden_moments(golden, list(modules.values()), stats.split("+")[0], tmp_path)
    if stats == "npz+projector":
        projectors = _imported_projectors(golden.root / "model", config, modules, reference,
                                          moments, tmp_path)  # fmt: skip
    else:
        with torch_threads(golden.threads("alphaedit")):
            projectors = {
                layer: null_space_projector(moments[m], config.nullspace_threshold)
                for layer, m in modules.items()
            }
    for layer, module in modules.items():
        errors[f"P.{module}"] = max_rel_error(projectors[layer], reference[f"P.{module}.weight"])
    cache_c = {layer: torch.zeros_like(p) for layer, p in projectors.items()}

    with torch_threads(1):
        templates = memit_context_templates(model, tokenizer, config)
        for request in golden.requests():
            result, cache_c = alphaedit_deltas(
                model,
                tokenizer,
                [request],
                config,
                projectors=projectors,
                cache_c=cache_c,
                context_templates=templates,
            )
            assert [d.module for d in result.updates] == list(modules.values())
            for layer, delta in zip(config.layers, result.updates, strict=True):
                apply_update_(weights[layer], delta, transposed=names.rewrite_weight_transposed)

    for layer, module in modules.items():
        param = f"{module}.weight"
        total = weights[layer].detach() - originals[layer]
        errors[f"delta.{param}"] = max_rel_error(total, reference[f"delta.{param}"])
        errors[f"cache_c.{module}"] = max_rel_error(cache_c[layer], reference[f"cache_c.{param}"])
    log.info("AlphaEdit golden relative errors: %s", errors)
    worst = {k: v for k, v in errors.items() if v > REL_TOL}
    assert not worst, f"relative errors above {REL_TOL}: {worst} (all: {errors})"


def _imported_projectors(
    model_dir: Path,
    config: AlphaEditConfig,
    modules: dict[int, str],
    reference: dict[str, torch.Tensor],
    moments: dict[str, torch.Tensor],
    tmp_path: Path,
) -> dict[int, torch.Tensor]:
    """The reference P of every layer, saved as AlphaEdit saves them, imported into the
    stats `golden_moments` wrote (tmp_path/imported) and loaded back from the derived
    cache by the campaign's own path."""
    from seqedit.methods.alphaedit import ALPHAEDIT, projector_from_basis
    from seqedit.workers.derived_store import derived_tensors
    from seqedit.workers.projector_import import import_null_space_projector

    stack = torch.stack([reference[f"P.{modules[layer]}.weight"] for layer in config.layers])
    torch.save(stack, tmp_path / "null_space_project.pt")
    stats_dir = tmp_path / "imported"
    import_null_space_projector(tmp_path / "null_space_project.pt", stats_dir, model_dir,
                                layers=list(config.layers),
                                nullspace_threshold=config.nullspace_threshold)  # fmt: skip
    by_layer = {layer: moments[m].float() for layer, m in modules.items()}
    derived, counts = derived_tensors(ALPHAEDIT, config, by_layer, stats_dir=stats_dir)
    assert counts == {"loaded": len(modules), "computed": 0}
    return {layer: projector_from_basis(derived[layer]) for layer in modules}
