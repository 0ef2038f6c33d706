"""The CounterFact language-model testbed's pieces: English text, closure under targets,
relation phrasings, packed rows with English, and a small end-to-end build."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from seqedit.schemas.requests import EditRequest, LocalityPrompt
from seqedit.testbed.build import (
    CORPUS_ENGLISH,
    CORPUS_FILE,
    HELDOUT_FILE,
    SUPPORT_FILE,
    TestbedConfig,
    covariance_corpus,
)
from seqedit.testbed.closure import SYNTHETIC_CASE_BASE, close_under_targets
from seqedit.testbed.dataset import build_dataset_testbed
from seqedit.testbed.english import ENGLISH_ENV, EnglishText, EnglishTextError, find_english
from seqedit.testbed.phrasings import relation_phrasings, subject_phrasings
from seqedit.testbed.text import PackedRows
from seqedit.testbed.world import synthetic_world, write_counterfact


def _req(case_id: int, prompt: str, subject: str, new: str, true: str, **kw: object) -> EditRequest:
    return EditRequest(
        case_id=case_id, prompt=prompt, subject=subject, target_new=new, target_true=true, **kw
    )


def _english(path: Path, n: int) -> Path:
    words = "the a river stone light small green quick music old house".split()
    lines = [
        f"Line {i} is " + " ".join(words[(i * k) % len(words)] for k in range(1, 7)) + "."
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- English text --------------------------------------------------------------------------


def test_english_text_holds_out_the_first_lines_and_trains_on_the_next(tmp_path: Path) -> None:
    path = tmp_path / "en.txt"
    path.write_text("one.\n\ntwo.\nthree.\nfour.\nfive.\n", encoding="utf-8")
    text = EnglishText.load(path, n_heldout=2, n_train=2)
    assert text.heldout == ["one.", "two."] and text.train == ["three.", "four."]


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such English text file"), (b"short.\n", "1 sentences"), (b"\xff\xfe\n", "UTF-8")],
)
def test_bad_english_text_is_one_error_naming_the_file(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "en.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(EnglishTextError, match=message) as caught:
        EnglishText.load(path, n_heldout=1, n_train=1)
    assert str(path) in str(caught.value)


def test_find_english_takes_the_environment_variable_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _english(tmp_path / "mine.txt", 3)
    monkeypatch.setenv(ENGLISH_ENV, str(path))
    assert find_english() == path


# --- closure under targets -----------------------------------------------------------------


def test_closure_takes_pool_records_then_invents_subjects() -> None:
    requests = [
        _req(0, "The mother tongue of {} is", "Ann Lee", "English", "French"),
        _req(1, "{} plays the", "Bo Ray", "piano", "guitar"),
        _req(2, "{} was born in", "Cy Dee", "French", "Paris"),  # French is known: no support
    ]
    pool = [
        _req(7, "{} speaks", "Ann Lee", "Dutch", "English"),  # an edited subject: never taken
        _req(8, "{} writes in", "Dee Fox", "Dutch", "English"),
    ]
    support = close_under_targets(requests, pool)
    assert [s.case_id for s in support] == [8, SYNTHETIC_CASE_BASE]
    invented = support[1]
    assert invented.prompt == "{} plays the" and invented.target_true == "piano"
    assert invented.subject not in {"Ann Lee", "Bo Ray", "Cy Dee", "Dee Fox"}
    answered = {r.target_true for r in [*requests, *support]}
    assert all(r.target_new in answered for r in requests)
    assert close_under_targets(requests, pool) == support  # deterministic


# --- relation phrasings --------------------------------------------------------------------


def test_neighbourhood_prompts_join_templates_into_relations() -> None:
    records = [
        _req(0, "The mother tongue of {} is", "Ann Lee", "English", "French",
             neighborhood_prompts=[LocalityPrompt(prompt="Max Ode is a native speaker of",
                                                  target="French")],
             paraphrase_prompts=["Rain fell. Where Ann Lee is from, people speak"]),
        _req(1, "{} is a native speaker of", "Bo Ray", "Dutch", "Greek"),
        _req(2, "{} is a native speaker of", "Cy Dee", "Dutch", "Greek"),
        _req(3, "{} plays the", "Di Fox", "piano", "guitar"),
    ]  # fmt: skip
    phrasings = relation_phrasings(records)
    language = ("{} is a native speaker of", "The mother tongue of {} is")  # most used first
    assert phrasings["The mother tongue of {} is"] == language
    assert phrasings["{} plays the"] == ("{} plays the",)
    assert not any("Where" in t for group in phrasings.values() for t in group)
    assert subject_phrasings(records[0], phrasings, 5) == ["Ann Lee is a native speaker of"]
    assert subject_phrasings(records[0], phrasings, 0) == []


# --- packed rows with English --------------------------------------------------------------


def test_packed_rows_mix_english_at_its_share() -> None:
    def rows(share: float) -> torch.Tensor:
        packed = PackedRows(
            [[5, 6]], [[15, 6]], seq_len=32, eos_id=0, dot_id=1, context_prob=0.0,
            generator=torch.Generator().manual_seed(0), english=[[9, 9, 9]],
            english_share=share,
        )  # fmt: skip
        inputs, labels, _ = packed.batch(64)
        assert torch.equal(labels[labels != -100], inputs[labels != -100])
        return inputs

    english = [(rows(s) == 9).sum().item() / 3 for s in (0.0, 0.5)]
    facts = [(rows(s) == 5).sum().item() for s in (0.0, 0.5)]
    assert english[0] == 0
    assert 0.35 < english[1] / (english[1] + facts[1]) < 0.65
    assert torch.equal(rows(0.5), rows(0.5))


def test_covariance_corpus_weighs_the_facts_like_the_english() -> None:
    facts = ["a is b", "c is d", "e is f"]
    english = [f"sentence {i}" for i in range(CORPUS_ENGLISH + 5)]
    corpus = covariance_corpus(facts, english)
    assert corpus.count("a is b") == CORPUS_ENGLISH // 3
    assert corpus[-CORPUS_ENGLISH:] == english[:CORPUS_ENGLISH]
    assert covariance_corpus(facts, english[:2]) == [*facts, *english[:2]]  # at least once
    assert covariance_corpus(facts, []) == facts  # facts-only builds: each fact once


# --- end to end ----------------------------------------------------------------------------


def test_language_model_build_learns_english_beside_the_facts(tmp_path: Path) -> None:
    data = write_counterfact(synthetic_world(24, 3), tmp_path / "cf.json")
    english = _english(tmp_path / "en.txt", 300)
    config = TestbedConfig.tiny().model_copy(
        update={"steps": 40, "english_train": 200, "english_heldout": 40, "max_phrasings": 2}
    )
    report = build_dataset_testbed(
        tmp_path / "tb", data, limit=16, config=config, english=english, progress=False
    )
    out = tmp_path / "tb"
    heldout = [json.loads(line)["text"] for line in (out / HELDOUT_FILE).open()]
    corpus = [json.loads(line)["text"] for line in (out / CORPUS_FILE).open()]
    support = (out / SUPPORT_FILE).read_text().splitlines()
    assert len(heldout) == 40 and not set(heldout) & set(corpus)
    assert set(EnglishText.load(english, n_heldout=40, n_train=200).train) <= set(corpus)
    assert report.english == str(english) and report.n_support == len(support)
    assert report.heldout_perplexity is not None and math.isfinite(report.heldout_perplexity)
    assert report.n_facts == 16


def test_a_dataset_build_without_english_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_counterfact(synthetic_world(5, 3), tmp_path / "cf.json")
    monkeypatch.setattr("seqedit.testbed.dataset.find_english", lambda: None)
    with pytest.raises(EnglishTextError, match="--english none"):
        build_dataset_testbed(tmp_path / "tb", data, progress=False)


def test_cli_english_goes_with_a_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from seqedit.pipeline.cli.main import main

    out = tmp_path / "tb"
    args = ["testbed", "build", "--out", str(out), "--synthetic", "5", "--english", "none"]
    assert main(args) == 2
    assert "--english goes with --dataset" in capsys.readouterr().err
    assert not out.exists()
