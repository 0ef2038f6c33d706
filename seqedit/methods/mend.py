"""MEND: a trained network that turns an edit's gradient into a weight update (Mitchell et
al., ICLR 2022, "Fast Model Editing at Scale").

For a linear map y = W u (math convention W: (d_out, d_in)) run on the T tokens of an edit
example, the gradient of the edit loss is a sum of rank-one terms, one per token:
    dL/dW = sum_t delta_t u_t^T,  u_t (d_in,) the map's input, delta_t (d_out,) dL/dy_t.
MEND never forms that matrix. A small network g maps each token's pair (u_t, delta_t) to
(u~_t, delta~_t) and the update is
    dW = -lr_m * sum_t delta~_t u~_t^T      (d_out, d_in), rank <= T,
with one learned edit learning rate lr_m per edited map. g is shared by the maps of one
shape (`MendEditor`) and told which map it serves by a per-map scale and shift of its hidden
layers. Its inputs are standardised with running statistics of the pairs seen in training
(`RunningStandardiser`), and its layers are low-rank residual blocks initialised to the
identity (`LowRankResidual`): an untrained MEND is a plain gradient step times lr_m
(`tests/methods/test_mend.py` checks it by hand).

Reference: eric-mitchell/mend `algs/mend.py` (GradientTransform, `edit`) and its `nn.py`
(IDMLP, LRLinear). Two deliberate differences: the update is SUBTRACTED (a gradient step;
the reference adds it and lets training learn the sign), and statistics taken from fewer
than two pairs leave the inputs as they are (the reference refuses to edit then).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seqedit.methods.arch import ModuleNames, module_weight
from seqedit.methods.hooks import ModuleTrace
from seqedit.methods.keys_values import model_device
from seqedit.methods.updates import LowRankDelta
from seqedit.schemas.requests import EditRequest, spaced


class MendNetworkConfig(BaseModel):
    """The shape of MEND's gradient network (reference names in parentheses)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=32, ge=1, description="Rank of each hidden layer (rank).")
    n_hidden: int = Field(
        default=1, ge=0, description="Hidden layers before the output layer (n_hidden)."
    )
    edit_lr: float = Field(
        default=1e-4, gt=0, description="Initial edit learning rate of every map (edit_lr)."
    )
    standardise: bool = Field(
        default=True, description="Standardise (u, delta) with running statistics (norm)."
    )


class Moments(NamedTuple):
    """Count, mean (d,) and sum of squared deviations (d,) of some vectors."""

    count: int
    mean: torch.Tensor
    sq_dev: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor) -> Moments:
        """The moments of the rows of `rows` (n, d), in float32."""
        rows = rows.detach().float()
        mean = rows.mean(0)
        return cls(int(rows.shape[0]), mean, ((rows - mean) ** 2).sum(0))

    def merged(self, other: Moments) -> Moments:
        """The moments of both sets of vectors (Chan et al.'s parallel update)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        shift = other.mean - self.mean
        mean = self.mean + shift * (other.count / count)
        sq_dev = self.sq_dev + other.sq_dev + shift**2 * (self.count * other.count / count)
        return Moments(count, mean, sq_dev)


class RunningStandardiser(nn.Module):
    """Running mean and standard deviation of vectors, and standardisation by them.

    Buffers (d,): `mean`, `sq_dev` (sum of squared deviations), and `count` (a 0-d tensor),
    so they are saved with the network. With fewer than two vectors seen, `forward` returns
    its input unchanged. Statistics are only added by `add` (the trainer does it once per
    step with the moments of every worker's vectors), never by a forward pass.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("sq_dev", torch.zeros(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def add(self, moments: Moments) -> None:
        """Add the vectors `moments` describes."""
        total = Moments(int(self.count), self.mean, self.sq_dev).merged(moments)
        self.count.fill_(total.count)
        self.mean.copy_(total.mean)
        self.sq_dev.copy_(total.sq_dev)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, d) rows standardised by the statistics so far (sample std, +1e-7)."""
        if int(self.count) < 2:
            return rows
        std = (self.sq_dev / (self.count - 1)).sqrt()
        return (rows - self.mean) / (std + 1e-7)


class LowRankResidual(nn.Module):
    """x + act(scale_m * (A (B x) + b) + shift_m) for (n, d) rows x and map index m.

    A (d, rank) starts at zero and b, shift at zero, scale at one: the block starts as the
    identity. `act` is ReLU in hidden layers and the identity in the output layer.
    """

    def __init__(self, dim: int, rank: int, n_maps: int, *, relu: bool) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, dim))  # B
        nn.init.xavier_uniform_(self.down)
        self.up = nn.Parameter(torch.zeros(dim, rank))  # A
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_maps, dim))
        self.shift = nn.Parameter(torch.zeros(n_maps, dim))
        self.relu = relu

    def forward(self, x: torch.Tensor, map_index: int) -> torch.Tensor:
        pre = (x @ self.down.T) @ self.up.T + self.bias
        pre = pre * self.scale[map_index] + self.shift[map_index]
        return x + (torch.relu(pre) if self.relu else pre)


class GradientTransform(nn.Module):
    """g: (u (T, d_in), delta (T, d_out)) -> (u~, delta~) for the maps of one shape.

    The concatenated pair (T, d_in + d_out) is standardised, then passes `n_hidden` ReLU
    blocks and one linear output block (`LowRankResidual`), and is split again.
    """

    def __init__(self, d_in: int, d_out: int, n_maps: int, config: MendNetworkConfig) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.standardiser = RunningStandardiser(dim)
        self.standardise = config.standardise
        self.blocks = nn.ModuleList(
            LowRankResidual(dim, config.rank, n_maps, relu=i < config.n_hidden)
            for i in range(config.n_hidden + 1)
        )

    def forward(
        self, u: torch.Tensor, delta: torch.Tensor, map_index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([u.float(), delta.float()], dim=-1)  # (T, d_in + d_out)
        if self.standardise:
            x = self.standardiser(x)
        for block in self.blocks:
            x = block(x, map_index)
        return x[:, : self.d_in], x[:, self.d_in :]


def shape_key(d_out: int, d_in: int) -> str:
    """The `MendEditor.transforms` key of maps of shape (d_out, d_in)."""
    return f"{d_out}x{d_in}"


class MendEditor(nn.Module):
    """MEND's trainable parts for a list of maps: one `GradientTransform` per weight shape,
    and the edit learning rates (n_maps,), one per map.

    Attributes:
        modules: the dotted names of the edited maps, in order.
        shapes: their (d_out, d_in).
    """

    def __init__(
        self, modules: Sequence[str], shapes: Sequence[tuple[int, int]], config: MendNetworkConfig
    ) -> None:
        super().__init__()
        if len(modules) != len(shapes) or not modules:
            raise ValueError(f"MEND needs one shape per module: {list(modules)}, {list(shapes)}")
        self.modules_edited = list(modules)
        self.shapes = [(int(a), int(b)) for a, b in shapes]
        self.map_index: list[int] = []
        counts: dict[str, int] = {}
        for d_out, d_in in self.shapes:
            key = shape_key(d_out, d_in)
            self.map_index.append(counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
        self.transforms = nn.ModuleDict(
            {
                key: GradientTransform(int(key.split("x")[1]), int(key.split("x")[0]), n, config)
                for key, n in counts.items()
            }
        )
        self.edit_lrs = nn.Parameter(torch.full((len(modules),), float(config.edit_lr)))

    def moments(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Moments]:
        """Per transform, the moments of the (u, delta) rows of `factors` (one (u, delta)
        per edited map, as `token_factors` returns them) that it standardises."""
        rows: dict[str, list[torch.Tensor]] = {}
        for (d_out, d_in), (u, delta) in zip(self.shapes, factors, strict=True):
            rows.setdefault(shape_key(d_out, d_in), []).append(torch.cat([u, delta], dim=-1))
        return {key: Moments.of(torch.cat(parts)) for key, parts in rows.items()}

    def add_moments(self, moments: dict[str, Moments]) -> None:
        """Add moments (from `moments`, merged over a step's requests and workers)."""
        for key, value in moments.items():
            self.transforms[key].standardiser.add(value)

    def update(self, i: int, u: torch.Tensor, delta: torch.Tensor) -> LowRankDelta:
        """The update of map i from its per-token inputs u (T, d_in) and output gradients
        delta (T, d_out): dW = -lr_i * delta~^T u~, as factors left (d_out, T), right (d_in, T).
        Differentiable in the network's parameters (training backpropagates through it)."""
        d_out, d_in = self.shapes[i]
        transform = self.transforms[shape_key(d_out, d_in)]
        u_t, delta_t = transform(u, delta, self.map_index[i])
        return LowRankDelta(
            module=self.modules_edited[i], left=-self.edit_lrs[i] * delta_t.T, right=u_t.T
        )


def default_mend_modules(names: ModuleNames, n_layers: int, last: int = 3) -> list[str]:
    """The MLP input and output maps of the last `last` blocks (the reference edits GPT-2's
    c_fc and c_proj of the last three blocks)."""
    layers = range(max(0, n_layers - last), n_layers)
    return [
        m
        for layer in layers
        for m in (names.module("mlp_in", layer), names.module("mlp_out", layer))
    ]


@dataclass
class EditExample:
    """One request as a teacher-forced example: input_ids (1, P+N), the N target positions'
    labels, and the positions whose logits predict them (P-1 .. P+N-2)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def of(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        request: EditRequest,
        device: torch.device,
        text: str | None = None,
    ) -> EditExample:
        """`text` (default: the filled rewrite prompt, e.g. a paraphrase) + target_new."""
        prompt = list(tokenizer(text or request.filled_prompt)["input_ids"])
        target = list(tokenizer(spaced(request.target_new), add_special_tokens=False)["input_ids"])
        if not prompt or not target:
            raise ValueError(f"case {request.case_id}: empty tokenisation of prompt or target")
        ids = torch.tensor([prompt + target], device=device)
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1, device=device)
        return cls(ids, torch.tensor(target, device=device), positions)

    def nll(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean NLL of the target tokens under logits (1, P+N, V)."""
        log_probs = torch.log_softmax(logits[0, self.positions].float(), dim=-1)  # (N, V)
        return -log_probs.gather(1, self.labels[:, None]).mean()

    def correct(self, logits: torch.Tensor) -> bool:
        """Whether every target token is the argmax of logits (1, P+N, V) at its position."""
        return bool((logits[0, self.positions].argmax(-1) == self.labels).all())


def token_factors_and_nll(
    model: PreTrainedModel,
    example: EditExample,
    modules: Sequence[str],
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
    """Per edited map, (u (T, d_in), delta (T, d_out)) float32: its input at every token of
    the example and the gradient of the example's NLL with respect to its output there;
    and that NLL (on the unedited model: the probes are zeros).

    Each map's output gets a zero probe added (a leaf requiring grad); the gradient with
    respect to the probe is delta. No parameter gradient is taken: weights, their flags and
    `.grad` are left as they were.
    """
    probes: dict[str, torch.Tensor] = {}

    def add_probe(name: str, output: torch.Tensor) -> torch.Tensor:
        probes[name] = torch.zeros_like(output, requires_grad=True)
        return output + probes[name]

    with torch.enable_grad():
        with ModuleTrace(model, modules, retain_input=True, edit_output=add_probe) as trace:
            logits = model(input_ids=example.input_ids).logits
        missing = [m for m in modules if m not in probes]
        if missing:
            raise ValueError(f"the forward pass did not run {missing}")
        nll = example.nll(logits)
        grads = torch.autograd.grad(nll, [probes[m] for m in modules])
    factors = [
        (trace.inputs[m][0].float(), g[0].float()) for m, g in zip(modules, grads, strict=True)
    ]
    return factors, float(nll.detach())


def token_factors(
    model: PreTrainedModel,
    example: EditExample,
    modules: Sequence[str],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`token_factors_and_nll` without the NLL."""
    return token_factors_and_nll(model, example, modules)[0]


def mend_updates_and_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    editor: MendEditor,
) -> tuple[list[LowRankDelta], float]:
    """MEND's update of every edited map for one request (model unchanged), without a
    graph into the editor's parameters (for editing, not training); and the target's NLL
    before the edit, from the same forward pass."""
    example = EditExample.of(tokenizer, request, model_device(model))
    factors, nll = token_factors_and_nll(model, example, editor.modules_edited)
    with torch.no_grad():
        return [editor.update(i, u, d) for i, (u, d) in enumerate(factors)], nll


def mend_updates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    editor: MendEditor,
) -> list[LowRankDelta]:
    """`mend_updates_and_nll` without the NLL."""
    return mend_updates_and_nll(model, tokenizer, request, editor)[0]


def weight_shapes(
    model: PreTrainedModel, modules: Sequence[str], transposed: bool
) -> list[tuple[int, int]]:
    """(d_out, d_in) of each module's weight in the math convention."""
    shapes = []
    for module in modules:
        weight, is_transposed = module_weight(model, module, transposed)
        rows, cols = weight.shape
        shapes.append((int(cols), int(rows)) if is_transposed else (int(rows), int(cols)))
    return shapes
