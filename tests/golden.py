"""Loader for a golden set: inputs and outputs of the original reference implementations.

Layout (see shared/golden/README.md): `model/`, `requests.json`, `hparams_<method>.json`,
`context_templates.json`, `cov.safetensors`, `<method>_result.safetensors`. The directory
comes from `SEQEDIT_GOLDEN_DIR`, defaulting to ../shared/golden/reference-tiny-gpt2
relative to the repository root; tests skip only when it is absent, and fail then under
CI (`tests.shared_files.require_shared`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.schemas.requests import EditRequest
from seqedit.workers.model_io import load_model
from tests.shared_files import SHARED_DIR, require_shared

DEFAULT_GOLDEN_DIR = SHARED_DIR / "golden" / "reference-tiny-gpt2"


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def reference_config(
    config_cls: type[ConfigT], hparams: dict[str, Any], **overrides: Any
) -> ConfigT:
    """Our config from a reference hparams JSON: every field our config shares with it by
    name (reference field names are ours), then `overrides` (e.g. ROME's single `layer`).
    Reference-only keys (module templates, stats dataset settings) are not config fields."""
    shared = {key: value for key, value in hparams.items() if key in config_cls.model_fields}
    return config_cls(**(shared | overrides))


def golden_dir() -> Path:
    """`SEQEDIT_GOLDEN_DIR` or the default set next to the repository."""
    return Path(os.environ.get("SEQEDIT_GOLDEN_DIR", str(DEFAULT_GOLDEN_DIR)))


def _target(value: Any) -> str | None:
    if value is None:
        return None
    return value["str"] if isinstance(value, dict) else str(value)


@dataclass(frozen=True)
class GoldenSet:
    """Read access to one golden directory."""

    root: Path

    def _json(self, name: str) -> Any:
        return json.loads((self.root / name).read_text())

    def hparams(self, method: str) -> dict[str, Any]:
        """The reference hyperparameters of `method` ('rome', 'memit', 'alphaedit')."""
        return self._json(f"hparams_{method}.json")

    def requests(self) -> list[EditRequest]:
        """The edit requests, in order."""
        return [
            EditRequest(
                case_id=r["case_id"],
                prompt=r["prompt"],
                subject=r["subject"],
                target_new=_target(r["target_new"]) or "",
                target_true=_target(r.get("target_true")),
            )
            for r in self._json("requests.json")
        ]

    def context_templates(self, method: str) -> Any:
        """ROME: a flat list; MEMIT/AlphaEdit: a list of lists."""
        return self._json("context_templates.json")[method]

    def threads(self, method: str) -> int:
        """Torch CPU threads of the reference run (`machine.threads`; 2 when not recorded)."""
        path = self.root / f"{method}_run.json"
        if not path.is_file():
            return 2
        return int(json.loads(path.read_text()).get("machine", {}).get("threads", 2))

    def model(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """A fresh copy of the model (float32, CPU, eval, no grads) and its tokenizer."""
        return load_model(self.root / "model")

    @cached_property
    def _cov_file(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / "cov.safetensors"))

    def second_moment(self, module: str) -> torch.Tensor:
        """(d_in, d_in) uncentred second moment E[k k^T] of `module`'s input (float32)."""
        return self._cov_file[f"{module}.cov"]

    def mom2_sum(self, module: str) -> torch.Tensor:
        """(d_in, d_in) sum of k k^T over `cov_count()` tokens."""
        return self._cov_file[f"{module}.mom2_sum"]

    def cov_count(self) -> int:
        """Number of tokens the second moments were accumulated over."""
        with safe_open(str(self.root / "cov.safetensors"), "pt") as handle:
            return int((handle.metadata() or {})["count"])

    def result(self, method: str) -> dict[str, torch.Tensor]:
        """All tensors of `<method>_result.safetensors`."""
        return load_file(str(self.root / f"{method}_result.safetensors"))

    def delta_params(self, method: str) -> list[str]:
        """Parameter names with a reference delta (keys `delta.<param>`), sorted."""
        return sorted(
            k.removeprefix("delta.") for k in self.result(method) if k.startswith("delta.")
        )


def require_golden() -> GoldenSet:
    """The golden set; when its directory does not exist, skip the test (fail it under CI)."""
    return GoldenSet(require_shared(golden_dir(), "golden set", "set SEQEDIT_GOLDEN_DIR"))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with `n` torch CPU threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|."""
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def write_reference_npz(golden: GoldenSet, modules: list[str], stats_root: Path) -> list[Path]:
    """The golden covariance of `modules` as the reference code caches it:
    `<stats_root>/<model>/wikitext_stats/<module>_float32_mom2_<n>.npz` with `mom2.mom2`
    (the float32 sum), `mom2.count`, `mom2.constructor`, `constructor` and `sample_size`."""
    import numpy as np

    folder = stats_root / "tiny-gpt2" / "wikitext_stats"
    folder.mkdir(parents=True, exist_ok=True)
    count = golden.cov_count()
    paths = []
    for module in modules:
        path = folder / f"{module}_float32_mom2_{count}.npz"
        np.savez(
            path,
            constructor=np.array("util.runningstats.CombinedStat()"),
            **{
                "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                "mom2.count": np.array(count),
                "mom2.mom2": golden.mom2_sum(module).numpy(),
            },
            sample_size=np.array(count),
        )
        paths.append(path)
    return paths


def golden_moments(
    golden: GoldenSet, modules: list[str], source: str, tmp: Path
) -> dict[str, torch.Tensor]:
    """module -> (d_in, d_in) C for the golden tests: the golden set's own (`source`
    "golden"), or (`"npz"`) the reference-layout caches of `write_reference_npz` through
    `seqedit stats import`, saved and loaded back as any stats directory."""
    if source == "golden":
        return {m: golden.second_moment(m) for m in modules}
    from seqedit.methods.arch import layer_and_role
    from seqedit.workers.stats_import import import_reference_stats
    from seqedit.workers.stats_store import load_stats, save_stats

    files = write_reference_npz(golden, modules, tmp / "data" / "stats")
    save_stats(tmp / "imported", import_reference_stats(files, golden.root / "model"))
    layers = {layer_and_role(f"{m}.weight")[0]: m for m in modules}
    moments = load_stats(tmp / "imported", layers=sorted(layers), model_dir=golden.root / "model")
    return {layers[layer]: c for layer, c in moments.items()}
