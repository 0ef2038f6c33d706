"""`seqedit trace`: heatmap PNG + result JSON from a model directory and a requests file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from seqedit.methods.trace_rows import TraceResult
from seqedit.pipeline.cli.main import main
from tests.methods.test_tracing import fact_requests, trained_model
from tests.methods.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 that knows the six facts of `fact_requests`, saved with its tokenizer."""
    out = tmp_path_factory.mktemp("traced") / "tiny-gpt2"
    tokenizer = tiny_tokenizer()
    trained_model("gpt2", tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _write_requests(path: Path, known: bool = True) -> Path:
    requests = fact_requests()
    if not known:
        requests = [r.model_copy(update={"target_true": "harp"}) for r in requests]
    path.write_text("".join(r.model_dump_json() + "\n" for r in requests))
    return path


def _trace(model_dir: Path, requests: Path, out: Path, *extra: str) -> int:
    flags = ["--samples", "3", "--window", "2", "--quiet", *extra]
    return main(["trace", "--model", str(model_dir), "--requests", str(requests),
                 "--out", str(out), *flags])  # fmt: skip


def test_trace_writes_the_heatmap_and_a_json_that_round_trips(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = _write_requests(tmp_path / "facts.jsonl")
    out = tmp_path / "plots" / "trace.png"
    assert _trace(model_dir, requests, out, "--limit", "5") == 0
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    text = (tmp_path / "plots" / "trace.json").read_text()
    result = TraceResult.model_validate_json(text)
    assert TraceResult.model_validate(json.loads(result.model_dump_json())) == result
    assert (result.n_records, result.n_traced, result.window) == (5, 5, 2)
    assert result.settings.samples == 3 and result.n_layer == 3
    assert result.model == "tiny-gpt2 (gpt2)"
    printed = capsys.readouterr().out
    assert "layer@last_subject" in printed and "traced 5 of 5 records" in printed
    for kind in ("hidden", "mlp", "attn"):
        assert kind in printed


def test_only_unknown_facts_is_one_line_naming_the_file_and_a_record(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = _write_requests(tmp_path / "wrong.jsonl", known=False)
    assert _trace(model_dir, requests, tmp_path / "t.png") == 2
    err = capsys.readouterr().err
    assert err.startswith("seqedit: error: ") and err.count("\n") == 1
    assert str(requests) in err and "case_id=0" in err and "target_true" in err
    assert not (tmp_path / "t.png").exists()


def test_a_missing_requests_file_is_named(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.jsonl"
    assert _trace(model_dir, missing, tmp_path / "t.png") == 2
    assert str(missing) in capsys.readouterr().err


def test_out_must_be_a_png(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = _write_requests(tmp_path / "facts.jsonl")
    assert _trace(model_dir, requests, tmp_path / "trace.pdf") == 2
    assert "png" in capsys.readouterr().err


def test_the_heatmap_greys_out_a_row_no_fact_has(tmp_path: Path) -> None:
    from seqedit.methods.trace_rows import ROW_LABELS, BestLayers, TraceSettings
    from seqedit.pipeline.results.trace_plot import aie_matrix, plot_trace

    rows = [[0.1 * i + 0.01 * layer for layer in range(48)] for i in range(6)]
    rows[1] = None  # type: ignore[call-overload]  # every subject was one token
    result = TraceResult(
        model="m", n_layer=48, settings=TraceSettings(), window=10, noise_std=0.1,
        n_records=2, n_traced=2, skipped_unknown=[], skipped_no_target=[], p_clean=0.9,
        p_corrupt=0.2, row_labels=list(ROW_LABELS), row_records=[2, 0, 2, 2, 2, 2],
        aie={kind: rows for kind in ("hidden", "mlp", "attn")},
        best_layers={kind: BestLayers(last_subject=47, last_token=47)
                     for kind in ("hidden", "mlp", "attn")},
        facts=[],
    )  # fmt: skip
    matrix = aie_matrix(result, "mlp")
    assert matrix.shape == (6, 48) and bool(np.isnan(matrix[1]).all())
    assert not np.isnan(np.delete(matrix, 1, axis=0)).any()
    out = plot_trace(result, tmp_path / "wide.png")
    assert out.local_path.read_bytes().startswith(b"\x89PNG")
