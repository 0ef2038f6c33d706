"""Stats building and store: golden agreement, provenance checks, corruption, corpus reading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from seqedit.workers.model_io import model_fingerprint
from seqedit.workers.stats import (
    META_FILE,
    STATS_FILE,
    StatsConfig,
    StatsResult,
    StatsStoreError,
    compute_stats,
)
from seqedit.workers.stats_store import load_accumulators, load_stats, save_stats
from tests.golden import golden_dir
from tests.shared_files import require_shared

GOLDEN = golden_dir()
WORDS = "the a cat dog sat on mat red blue runs far away".split()
LINES = [
    "the cat sat on the mat",
    "",
    "a red dog runs far away",
    "   ",
    "the blue cat",
    "dog",
    "a cat sat on a red mat the dog runs far away the cat sat on the mat",  # > 16 tokens
    "the dog sat",
]


def _tiny_model_dir(path: Path, seed: int) -> Path:
    """A 3-layer GPT-2 (n_embd 16, context 16) with a word-level tokenizer, saved to ``path``."""
    vocab = {w: i for i, w in enumerate(["<eos>", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=3, n_embd=16, n_head=2, n_positions=16, vocab_size=len(vocab))
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def result(tiny: Path, corpus: Path) -> StatsResult:
    return compute_stats(tiny, StatsConfig(layers=[2, 0], corpus=[corpus]), progress=False)


@pytest.fixture()
def saved(tmp_path: Path, result: StatsResult) -> Path:
    save_stats(tmp_path / "stats", result)  # returns its Location; the tests want a Path
    return tmp_path / "stats"


# ----------------------------------------------------------------------------- golden


@pytest.mark.slow
def test_matches_golden_covariance(tmp_path: Path) -> None:
    require_shared(GOLDEN / "cov.safetensors", "golden set", "set SEQEDIT_GOLDEN_DIR")
    recipe = json.loads((GOLDEN / "recipe.json").read_text())["stats"]
    golden = load_file(GOLDEN / "cov.safetensors")
    layers = sorted({int(k.split(".")[2]) for k in golden})
    config = StatsConfig(
        layers=layers,
        corpus=[GOLDEN / "corpus.txt"],
        max_length=128,
        batch_size=64,
        dtype="float64",
        # the recipe batches lines in file order; length-sorted batches (the default, less
        # padding) hold the same tokens, only the float64 summation order differs (~4e-8)
    )
    res = compute_stats(GOLDEN / "model", config, progress=False)
    assert res.meta.token_count == recipe["count"] == 75057  # no bos/eos added per line
    for layer in layers:
        name = f"transformer.h.{layer}.mlp.c_proj"
        acc = res.accumulators[layer]
        assert acc.count == 75057 and acc.sum is not None
        ref_cov = golden[f"{name}.cov"].double()
        ref_sum = golden[f"{name}.mom2_sum"].double()
        cov = acc.moment()
        assert float((cov - ref_cov).norm() / ref_cov.norm()) < 1e-5
        assert float((acc.sum - ref_sum).norm() / ref_sum.norm()) < 1e-5
        torch.testing.assert_close(cov, ref_cov, rtol=1e-5, atol=1e-5 * float(ref_cov.abs().max()))
    stats_dir = save_stats(tmp_path / "golden_stats", res)
    loaded = load_stats(stats_dir, layers=layers, model_dir=GOLDEN / "model", dtype=torch.float32)
    for layer in layers:
        ref = golden[f"transformer.h.{layer}.mlp.c_proj.cov"]
        torch.testing.assert_close(loaded[layer], ref, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- compute


def test_counts_truncation_and_metadata(result: StatsResult, tiny: Path, corpus: Path) -> None:
    expected = sum(min(len(line.split()), 16) for line in LINES if line.strip())
    assert result.meta.token_count == expected
    assert result.meta.max_length == 16  # the model context by default
    assert result.meta.n_documents == 6
    assert result.meta.layers == [0, 2]
    assert result.meta.module_names == {
        0: "transformer.h.0.mlp.c_proj",
        2: "transformer.h.2.mlp.c_proj",
    }
    assert result.meta.model_fingerprint == model_fingerprint(tiny)
    assert result.meta.corpus_files == [corpus.name]
    for acc in result.accumulators.values():
        assert acc.count == expected and acc.sum is not None
        assert acc.sum.dtype == torch.float64 and acc.sum.shape == (64, 64)


def test_sorting_and_batch_size_change_only_rounding(
    result: StatsResult, tiny: Path, corpus: Path
) -> None:
    config = StatsConfig(layers=[0, 2], corpus=[corpus], batch_size=2, sort_by_length=False)
    other = compute_stats(tiny, config, progress=True)
    for layer in (0, 2):
        a, b = result.accumulators[layer], other.accumulators[layer]
        assert a.count == b.count and a.sum is not None and b.sum is not None
        torch.testing.assert_close(a.sum, b.sum, rtol=1e-5, atol=1e-6)


def test_jsonl_corpus_equals_text_corpus(result: StatsResult, tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": line}) for line in LINES) + "\n\n")
    res = compute_stats(tiny, StatsConfig(layers=[0, 2], corpus=[path]), progress=False)
    assert res.meta.token_count == result.meta.token_count
    for layer in (0, 2):
        torch.testing.assert_close(res.accumulators[layer].sum, result.accumulators[layer].sum)


def test_n_samples_is_deterministic(tiny: Path, corpus: Path) -> None:
    def run(seed: int) -> StatsResult:
        config = StatsConfig(layers=[1], corpus=[corpus], n_samples=3, seed=seed)
        return compute_stats(tiny, config, progress=False)

    a, b, c = run(0), run(0), run(5)
    assert a.meta.n_documents == 3 and a.meta.n_samples == 3
    assert torch.equal(a.accumulators[1].sum, b.accumulators[1].sum)  # type: ignore[arg-type]
    assert a.meta.token_count == b.meta.token_count
    assert a.meta.token_count != c.meta.token_count  # seed 5 picks other lines (6 choose 3)


# ----------------------------------------------------------------------------- store


def test_round_trip(saved: Path, result: StatsResult, tiny: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == sorted([STATS_FILE, META_FILE])  # no tmp left
    back = load_accumulators(saved)
    assert back.meta == result.meta.model_copy(update={"sha256": None})
    for layer, acc in result.accumulators.items():
        assert back.accumulators[layer].count == acc.count
        assert torch.equal(back.accumulators[layer].sum, acc.sum)  # type: ignore[arg-type]
    moments = load_stats(saved, layers=[2], model_dir=tiny)
    assert list(moments) == [2] and moments[2].dtype == torch.float64
    torch.testing.assert_close(moments[2], result.accumulators[2].moment(), rtol=0, atol=0)
    fp = model_fingerprint(tiny)
    assert load_stats(saved, layers=[0], expected_fingerprint=fp, dtype=torch.float32)[0].dtype == (
        torch.float32
    )
    sidecar = json.loads((saved / META_FILE).read_text())
    assert sidecar["token_count"] == result.meta.token_count and len(sidecar["sha256"]) == 64
    raw = load_file(saved / STATS_FILE)
    assert set(raw) == {
        f"transformer.h.{i}.mlp.c_proj.{k}" for i in (0, 2) for k in ("mom2_sum", "count")
    }


def test_other_model_is_refused(saved: Path, tmp_path: Path) -> None:
    other = _tiny_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(StatsStoreError, match=rf"{STATS_FILE}: model_fingerprint mismatch"):
        load_stats(saved, layers=[0], model_dir=other)
    with pytest.raises(StatsStoreError, match="model_fingerprint"):
        load_stats(saved, layers=[0], expected_fingerprint="0" * 64)


def test_missing_layer_and_wrong_module_are_refused(saved: Path) -> None:
    with pytest.raises(StatsStoreError, match=r"layers: layer 1 not stored \(stored: \[0, 2\]\)"):
        load_stats(saved, layers=[0, 1])
    with pytest.raises(StatsStoreError, match="module_names: layer 0 stored for"):
        load_stats(saved, layers=[0], module_tmp="model.layers.{}.mlp.down_proj")


@pytest.mark.parametrize("keep_sidecar", [True, False])
def test_truncated_file_is_refused(saved: Path, keep_sidecar: bool) -> None:
    path = saved / STATS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if not keep_sidecar:
        (saved / META_FILE).unlink()
    with pytest.raises(StatsStoreError, match=rf"{STATS_FILE}: corrupt or truncated"):
        load_stats(saved, layers=[0])


@pytest.mark.parametrize("keep_sidecar", [True, False])
def test_altered_tensor_bytes_are_refused(saved: Path, keep_sidecar: bool) -> None:
    path = saved / STATS_FILE
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's data; the header stays valid
    path.write_bytes(bytes(data))
    if not keep_sidecar:
        (saved / META_FILE).unlink()
    with pytest.raises(StatsStoreError, match="tensors_sha256"):
        load_stats(saved, layers=[0])


def test_sidecar_must_match_file(saved: Path) -> None:
    sidecar = json.loads((saved / META_FILE).read_text())
    sidecar["token_count"] += 1
    (saved / META_FILE).write_text(json.dumps(sidecar))
    with pytest.raises(StatsStoreError, match=rf"{META_FILE}: does not describe"):
        load_accumulators(saved)


def test_missing_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StatsStoreError, match="stats file not found"):
        load_stats(tmp_path, layers=[0])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="distinct"):
        StatsConfig(layers=[1, 1], corpus=[Path("x.txt")])
    with pytest.raises(ValueError, match="module_tmp"):
        StatsConfig(layers=[1], corpus=[Path("x.txt")], module_tmp="transformer.h.mlp")
    with pytest.raises(ValueError):
        StatsConfig(layers=[1], corpus=[Path("x.txt")], dtype="float16")  # type: ignore[arg-type]
