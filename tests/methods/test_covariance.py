"""Second-moment accumulation: exact merging, one pass == per-layer passes, pads, early stop."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from seqedit.methods.covariance import SecondMomentAccumulator, accumulate_second_moments

TMP = "transformer.h.{}.mlp.c_proj"
VOCAB = 50


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=16, n_head=2, n_positions=32, vocab_size=VOCAB)
    return GPT2LMHeadModel(cfg).eval()


def _batches(seed: int = 1, pad_id: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three right-padded batches (B=4, T=12) of random lengths 1..12."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        lengths = torch.randint(1, 13, (4,), generator=gen)
        ids = torch.randint(1, VOCAB, (4, 12), generator=gen)
        mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
        out.append((torch.where(mask.bool(), ids, torch.full_like(ids, pad_id)), mask))
    return out


def _reference(model: nn.Module, batches: list, name: str) -> tuple[torch.Tensor, int]:
    """One full forward per batch for ONE module, as the reference implementation does."""
    captured: list[torch.Tensor] = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    total = torch.zeros(module.weight.shape[0], module.weight.shape[0], dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for ids, mask in batches:
            captured.clear()
            model(input_ids=ids, attention_mask=mask)
            k = captured[0][mask.bool()].double()  # (n_tokens, d_in)
            total += k.T @ k
            count += k.shape[0]
    handle.remove()
    return total, count


def test_merge_is_exact_sum_of_sums() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (300, 8), generator=gen).double()  # integers: sums are exact
    whole = SecondMomentAccumulator()
    whole.update(x)
    parts = [SecondMomentAccumulator() for _ in range(3)]
    for acc, chunk in zip(parts, (x[:17], x[17:200], x[200:]), strict=True):
        acc.update(chunk)
    merged = SecondMomentAccumulator()
    for acc in parts:
        merged.merge(acc)
    assert merged.sum is not None and whole.sum is not None
    assert torch.equal(merged.sum, whole.sum)
    assert merged.count == whole.count == 300
    assert torch.equal(merged.moment(), x.T @ x / 300)
    merged.merge(SecondMomentAccumulator())  # merging an empty one changes nothing
    assert merged.count == 300


def test_accumulator_checks() -> None:
    acc = SecondMomentAccumulator(4, dtype=torch.float32)
    assert acc.d_in == 4 and acc.sum is not None and acc.sum.dtype == torch.float32
    with pytest.raises(ValueError, match="empty"):
        acc.moment()
    with pytest.raises(ValueError, match="d_in"):
        acc.update(torch.ones(3, 5))
    with pytest.raises(ValueError, match="n_tokens"):
        acc.update(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="shape"):
        acc.merge(SecondMomentAccumulator.from_state(torch.ones(3, 3), 2))
    with pytest.raises(ValueError, match="float32 or float64"):
        SecondMomentAccumulator(dtype=torch.float16)
    acc.update(torch.ones(0, 4))
    assert acc.count == 0


def test_one_pass_equals_one_layer_at_a_time(model: GPT2LMHeadModel) -> None:
    batches = _batches()
    names = [TMP.format(layer) for layer in (0, 1, 2)]
    accs = accumulate_second_moments(model, batches, names, torch.float64)
    expected_count = int(sum(mask.sum() for _, mask in batches))
    for name in names:
        ref_sum, ref_count = _reference(model, batches, name)
        assert accs[name].count == ref_count == expected_count
        assert accs[name].sum is not None
        torch.testing.assert_close(accs[name].sum, ref_sum, rtol=1e-12, atol=1e-12)


def test_pad_tokens_are_excluded(model: GPT2LMHeadModel) -> None:
    names = [TMP.format(1)]
    padded = accumulate_second_moments(model, _batches(pad_id=0), names)[names[0]]
    other_pad = accumulate_second_moments(model, _batches(pad_id=7), names)[names[0]]
    singles = [
        (ids[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())])
        for ids, mask in _batches()
        for i in range(ids.shape[0])
    ]
    unpadded = accumulate_second_moments(model, singles, names)[names[0]]
    assert padded.count == other_pad.count == unpadded.count
    assert padded.sum is not None and other_pad.sum is not None and unpadded.sum is not None
    torch.testing.assert_close(padded.sum, other_pad.sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded.sum, unpadded.sum, rtol=1e-5, atol=1e-6)


def test_forward_stops_after_last_needed_module(model: GPT2LMHeadModel) -> None:
    calls: dict[str, int] = {}
    watched = ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj", "transformer.h.2"]
    watched += ["lm_head", "transformer.ln_f"]
    modules = dict(model.named_modules())

    def counter(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            calls[name] = calls.get(name, 0) + 1

        return hook

    handles = [modules[n].register_forward_hook(counter(n)) for n in watched]
    try:
        # requested in reverse order: the stop must not depend on the order given
        names = [TMP.format(1), TMP.format(0)]
        accumulate_second_moments(model, _batches(), names, torch.float32)
    finally:
        for handle in handles:
            handle.remove()
    assert calls.get("transformer.h.0.mlp.c_proj") == 3  # once per batch
    assert "transformer.h.1.mlp.c_proj" not in calls  # stopped before the last one ran
    assert "transformer.h.2" not in calls and "lm_head" not in calls
    assert "transformer.ln_f" not in calls
    assert all(not m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_hooks_removed_after_error_and_unknown_module(model: GPT2LMHeadModel) -> None:
    with pytest.raises(KeyError, match="not found"):
        accumulate_second_moments(model, _batches(), ["transformer.h.9.mlp.c_proj"])
    bad = [(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))]
    with pytest.raises(ValueError, match="attention_mask"):
        accumulate_second_moments(model, bad, [TMP.format(0)])
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_continues_existing_accumulators(model: GPT2LMHeadModel) -> None:
    names = [TMP.format(0)]
    batches = _batches()
    whole = accumulate_second_moments(model, batches, names)
    resumed = accumulate_second_moments(model, batches[:1], names)
    accumulate_second_moments(model, batches[1:], names, accumulators=resumed)
    assert resumed[names[0]].count == whole[names[0]].count
    assert resumed[names[0]].sum is not None and whole[names[0]].sum is not None
    torch.testing.assert_close(resumed[names[0]].sum, whole[names[0]].sum)
