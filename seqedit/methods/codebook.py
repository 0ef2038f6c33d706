"""A discrete key-value codebook: the shared ops of memory-based editors (GRACE).

Rows are (key (d_in,), value (d_out,), radius, label (W,) int64 padded with -1); `plan_edit`
is the rule that decides which rows an edit adds or changes. A
position retrieves the nearest key within its radius; the retrieved value replaces the
output there. Rows are written by upserts with exact copies, so a codebook replayed from an
edit log's memory entries is bit for bit the one that was edited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PAD = -1
"""Label padding (token ids are >= 0)."""

NAMES = ("keys", "values", "radii", "labels")
"""The codebook's tensors, in the order `upsert` takes and returns them."""

MARGIN = 1e-5
"""The gap between the two radii of a split (as in the GRACE reference)."""


def retrieve(inputs: torch.Tensor, keys: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """(B, T) row retrieved at each position of `inputs` (B, T, d_in), -1 where none.

    The nearest of `keys` (n, d_in) by exact Euclidean distance in float32 (pairwise
    differences, not the matmul expansion), kept when within its radius (`radii` (n,)).
    """
    batch, width, dim = inputs.shape
    if keys.shape[0] == 0:
        return torch.full((batch, width), -1, dtype=torch.long, device=inputs.device)
    flat = inputs.detach().reshape(batch * width, dim).float()
    dist = torch.cdist(flat, keys, compute_mode="donot_use_mm_for_euclid_dist")  # (BT, n)
    nearest, row = dist.min(dim=1)  # (BT,), (BT,)
    row = torch.where(nearest <= radii[row], row, -1)
    return row.reshape(batch, width)


def substitute(
    outputs: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, replacement: str
) -> torch.Tensor:
    """`outputs` (B, T, d_out) with the retrieved `values` (n, d_out) put in (`rows` (B, T)
    from `retrieve`); differentiable in `values`."""
    if replacement == "replace_all":  # carry the latest retrieval forward along the row
        positions = torch.arange(rows.shape[1], device=rows.device).expand_as(rows)
        latest = torch.where(rows >= 0, positions, -1).cummax(dim=1).values  # (B, T)
        rows = torch.where(latest >= 0, rows.gather(1, latest.clamp_min(0)), -1)
    hit = rows >= 0  # (B, T)
    if not bool(hit.any()):
        return outputs
    picked = values[rows.clamp_min(0)].to(outputs.dtype)  # (B, T, d_out)
    return torch.where(hit[..., None], picked, outputs)


def pad_labels(labels: torch.Tensor, width: int) -> torch.Tensor:
    """(m, W) labels padded with -1 to (m, width)."""
    return nn.functional.pad(labels, (0, width - labels.shape[1]), value=PAD)


def upsert(
    codebook: tuple[torch.Tensor, ...], entry: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """New (keys, values, radii, labels) with `entry`'s rows written in; a row equal to the
    current size onwards appends (consecutively). Exact copies: replays are bit for bit."""
    keys, values, radii, labels = codebook
    rows = entry["rows"].to(device=keys.device, dtype=torch.long)  # (m,)
    size, listed = keys.shape[0], rows.tolist()
    new = sorted(r for r in listed if r >= size)
    if len(set(listed)) != len(listed) or new != list(range(size, size + len(new))):
        raise ValueError(f"memory entry rows {listed} do not fit a codebook of {size}")
    width = max(labels.shape[1], entry["labels"].shape[1])
    out = []
    for current, name in zip((keys, values, radii, pad_labels(labels, width)), NAMES, strict=True):
        part = entry[name].to(device=current.device, dtype=current.dtype)
        if name == "labels":
            part = pad_labels(part, width)
        grown = torch.cat([current, current.new_zeros((len(new), *current.shape[1:]))])
        out.append(grown.index_copy(0, rows, part))
    return tuple(out)


@dataclass
class Plan:
    """What one edit writes: rows (m,), their keys (m, d_in), values (m, d_out) (the
    trained one is `values[trained]`), radii (m,), labels (m, W)."""

    action: str
    rows: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    radii: torch.Tensor
    labels: torch.Tensor
    trained: int
    distance: float | None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The memory entry's tensors."""
        return {"rows": self.rows, "keys": self.keys, "values": self.values,
                "radii": self.radii, "labels": self.labels}  # fmt: skip


def plan_edit(
    codebook: tuple[torch.Tensor, ...], query: torch.Tensor, label: torch.Tensor,
    init: torch.Tensor, eps_init: float, eps_expand: str,
) -> Plan:  # fmt: skip
    """GRACE's add / split / overwrite / expand / update decision for `query` (d_in,)
    float32 with `label` (N,) token ids and a new value's `init` (d_out,), against
    `codebook` (keys, values, radii, labels); new keys get radius `eps_init`, and a same-label
    expansion also moves the key halfway to the query when `eps_expand` is 'moving_average'."""
    keys, values, radii, labels = codebook
    n, width = keys.shape[0], max(labels.shape[1], label.shape[0])
    labels = pad_labels(labels, width)
    label = pad_labels(label[None], width)[0]
    eps = torch.tensor(eps_init, device=keys.device)

    def plan(action: str, rows: list[int], *parts: torch.Tensor, trained: int = 0) -> Plan:
        tensors = [torch.stack(list(p)) for p in zip(*parts, strict=True)]
        index = torch.tensor(rows, device=keys.device)
        return Plan(action, index, *tensors, trained, None if n == 0 else float(d))

    if n == 0:
        return plan("add", [0], (query, init, eps, label))
    dists = torch.cdist(query[None], keys, compute_mode="donot_use_mm_for_euclid_dist")[0]
    d, j = dists.min(dim=0)
    j = int(j)
    old = (keys[j], values[j], radii[j], labels[j])
    if bool(d > eps + radii[j]):
        return plan("add", [n], (query, init, eps, label))
    if not torch.equal(labels[j], label):
        if bool(d / 2 <= MARGIN):
            return plan("overwrite", [j], (keys[j], init, radii[j], label))
        shrunk = torch.minimum(radii[j], d / 2 - MARGIN)
        new = (query, init, torch.minimum(eps, d / 2), label)
        return plan("split", [j, n], (*old[:2], shrunk, old[3]), new, trained=1)
    if bool(d > radii[j]):
        key = 0.5 * keys[j] + 0.5 * query if eps_expand == "moving_average" else keys[j]
        return plan("expand", [j], (key, values[j], d, labels[j]))
    return plan("update", [j], old)


LABEL_TOKENS = 4
"""Typical label width (tokens of a target_new), for disk estimates."""


def footprint_rows(
    empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor], d_in: int, d_out: int, n: int
) -> dict[str, torch.Tensor]:
    """n codebook rows made by `empty(shape, dtype)` (no data needed): keys (n, d_in),
    values (n, d_out), radii (n,) float32 and labels (n, LABEL_TOKENS) int64."""
    return {"keys": empty((n, d_in), torch.float32), "values": empty((n, d_out), torch.float32),
            "radii": empty((n,), torch.float32),
            "labels": empty((n, LABEL_TOKENS), torch.long)}  # fmt: skip
