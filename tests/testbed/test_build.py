"""Testbed builds: deterministic, loadable with the standard HF classes, and they know facts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from seqedit.files import file_sha256
from seqedit.testbed.build import (
    CORPUS_FILE,
    REPORT_FILE,
    REQUESTS_FILE,
    PackedRows,
    TestbedConfig,
    TestbedReport,
    build_synthetic_testbed,
    build_testbed,
    first_token_hits,
    load_testbed,
)
from seqedit.testbed.dataset import build_dataset_testbed
from seqedit.testbed.world import fact_statements, synthetic_world, write_counterfact
from seqedit.workers.model_io import load_model

# A few steps only: enough to test determinism and files, not to learn the facts.
SHORT = TestbedConfig.tiny().model_copy(update={"steps": 12, "target_recall": None})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TestbedReport]:
    """The tiny testbed the campaign tests use: 40 synthetic facts."""
    out = tmp_path_factory.mktemp("tiny") / "testbed"
    return out, build_synthetic_testbed(out, 40, 0, TestbedConfig.tiny(), progress=False)


def test_tiny_testbed_knows_its_facts(tiny: tuple[Path, TestbedReport]) -> None:
    _, report = tiny
    assert report.n_facts == 40
    assert report.recall >= 0.9
    assert report.paraphrase_recall is not None and report.paraphrase_recall >= 0.8
    assert report.neighborhood_recall is not None and report.neighborhood_recall >= 0.8
    assert report.context_recall >= 0.7
    assert report.source == "synthetic:40:0" and report.seed == 0
    assert report.case_ids == list(range(40))
    assert report.history and report.history[-1].step == report.steps
    assert report.stopped_early == (report.steps < report.config.steps)


def test_directory_loads_with_auto_classes_and_model_io(tiny: tuple[Path, TestbedReport]) -> None:
    out, report = tiny
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "gpt2" and model.config.n_layer == 4
    assert model.config.n_positions >= 128
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0 == model.config.eos_token_id
    loaded, loaded_tokenizer = load_model(out)
    _, requests = load_testbed(out)
    hits = first_token_hits(
        loaded,
        loaded_tokenizer,
        [r.filled_prompt for r in requests],
        [r.target_true or "" for r in requests],
    )
    assert sum(hits) / len(hits) == report.recall  # the saved model is the measured one
    assert [r.case_id for r, hit in zip(requests, hits, strict=True) if not hit] == (
        report.unknown_case_ids
    )


def test_report_requests_and_corpus_are_written(tiny: tuple[Path, TestbedReport]) -> None:
    out, report = tiny
    stored, requests = load_testbed(out)
    assert stored == report
    assert TestbedReport.model_validate_json((out / REPORT_FILE).read_text()) == report
    assert requests == synthetic_world(40, 0)
    assert len((out / REQUESTS_FILE).read_text().splitlines()) == 40
    corpus = [json.loads(line)["text"] for line in (out / CORPUS_FILE).read_text().splitlines()]
    assert corpus == fact_statements(requests)


def test_same_seed_same_weights_and_tokenizer(tmp_path: Path) -> None:
    world = synthetic_world(20, 1)
    for name in ("a", "b"):
        build_testbed(tmp_path / name, world, SHORT, progress=False)
    build_testbed(tmp_path / "c", world, SHORT, seed=1, progress=False)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b", "c"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()


def test_build_leaves_the_callers_torch_state_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    build_testbed(tmp_path / "x", synthetic_world(10, 0), SHORT, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_dataset_build_records_the_source_and_its_hash(tmp_path: Path) -> None:
    data = write_counterfact(synthetic_world(15, 2), tmp_path / "cf.json")
    report = build_dataset_testbed(
        tmp_path / "tb", data, limit=10, config=SHORT, english=None, progress=False
    )
    assert report.source == str(data)
    assert report.source_sha256 == file_sha256(data)
    assert report.case_ids == list(range(10))


def _packed(context_prob: float) -> PackedRows:
    bare = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    spaced = [[15, 6, 7], [18, 9], [20, 11, 12, 13]]  # the same statements after a space
    return PackedRows(
        bare,
        spaced,
        seq_len=10,
        eos_id=0,
        dot_id=1,
        context_prob=context_prob,
        generator=torch.Generator().manual_seed(0),
    )


def _pieces(tokens: list[int]) -> list[list[int]]:
    pieces: list[list[int]] = [[]]
    for token in tokens:
        if token == 0:
            pieces.append([])
        else:
            pieces[-1].append(token)
    return pieces


def test_packed_rows_pack_whole_statements_and_mask_the_padding() -> None:
    inputs, labels, mask = _packed(0.0).batch(6)
    assert inputs.shape == labels.shape == mask.shape == (6, 10)
    bare = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    for row, row_labels, row_mask in zip(
        inputs.tolist(), labels.tolist(), mask.tolist(), strict=True
    ):
        used = sum(row_mask)
        assert row_mask == [1] * used + [0] * (10 - used)
        assert row_labels == row[:used] + [-100] * (10 - used)
        assert all(piece in bare for piece in _pieces(row[:used]))


def test_packed_rows_put_context_fragments_before_some_statements() -> None:
    inputs, labels, mask = _packed(1.0).batch(8)
    spaced = [[15, 6, 7], [18, 9], [20, 11, 12, 13]]
    for row, row_labels, row_mask in zip(
        inputs.tolist(), labels.tolist(), mask.tolist(), strict=True
    ):
        used = sum(row_mask)
        for piece, piece_labels in zip(
            _pieces(row[:used]), _pieces(row_labels[:used]), strict=True
        ):
            dot = piece.index(1)  # fragment "." statement; the fragment is not predicted
            assert dot >= 1 and piece_labels[: dot + 1] == [-100] * (dot + 1)
            statement = piece[dot + 1 :]
            assert statement == piece_labels[dot + 1 :]
            truncated = used == 10 and any(s[: len(statement)] == statement for s in spaced)
            assert statement in spaced or truncated


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="divisible"):
        TestbedConfig(n_embd=100, n_head=3)
    with pytest.raises(ValidationError, match="exceeds n_positions"):
        TestbedConfig(seq_len=256, n_positions=128)
    with pytest.raises(ValidationError):
        TestbedConfig(n_layer=2)
    with pytest.raises(ValueError, match="at least one request"):
        build_testbed("/nonexistent/never", [], SHORT)
