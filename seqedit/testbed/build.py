"""Build the fact testbed: a tiny GPT-2 trained from scratch until it really knows the facts.

`build_testbed(out_dir, requests, config)` trains a byte-level BPE tokenizer and a small
`GPT2LMHeadModel` on the true facts of `requests` (`fact_statements`), then measures top-1
recall of each fact's first target token after its filled rewrite prompt and writes a
standard Hugging Face model directory:

    config.json, model.safetensors, generation_config.json   the model (save_pretrained)
    tokenizer.json, tokenizer_config.json                    the tokenizer (save_pretrained)
    requests.jsonl    the EditRequests the model was trained on, one JSON per line
    splits.json       with `split=`: train/validation/test case_ids, no subject shared
    requests-<split>.jsonl   with `split=`: each split's requests (train, validation, test)
    corpus.jsonl      the training statements, {"text": ...} per line (a covariance corpus)
    testbed.json      TestbedReport, written last: its presence marks a complete build
    training-checkpoint.pt   only while training: the loop's state at the last recall
                      check; a build run again with the same inputs resumes from it

Training is deterministic for a seed on a given machine, torch version and thread count:
the model is initialised under a forked, seeded RNG (the caller's RNG state is untouched)
and batches are drawn from a private `torch.Generator`. Each batch row packs whole
statements separated by `<|endoftext|>`, the first starting at position 0 (as prompts do
when they are scored); a share (`context_prob`) of the statements follow a context
fragment shaped like ROME's context templates ("The mother tongue of. {}"), so the facts
also hold inside text. Recall is evaluated every `eval_every` steps; training stops once
it reaches `target_recall`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from seqedit.files import file_sha256
from seqedit.methods.locality import perplexity
from seqedit.schemas.requests import EditRequest, spaced
from seqedit.testbed.build_process import quiet_build
from seqedit.testbed.checkpoint import CHECKPOINT_FILE, TrainingCheckpoint, build_fingerprint
from seqedit.testbed.english import EnglishText
from seqedit.testbed.phrasings import relation_phrasings, subject_phrasings
from seqedit.testbed.splits import (
    SPLIT_NAMES,
    SPLITS_FILE,
    RequestSplits,
    SplitName,
    SplitSpec,
    split_requests,
    split_requests_file,
    write_splits,
)
from seqedit.testbed.text import PackedRows, train_tokenizer
from seqedit.testbed.train import (
    RecallPoint,
    TestbedConfig,
    first_token_hits,
    in_context_prompts,
    init_model,
    mean_or_none,
    pair_recall,
    train_model,
)
from seqedit.testbed.world import TestbedError, fact_statements, synthetic_world

log = logging.getLogger(__name__)

REPORT_FILE: Final = "testbed.json"
REQUESTS_FILE: Final = "requests.jsonl"
CORPUS_FILE: Final = "corpus.jsonl"
SUPPORT_FILE: Final = "support.jsonl"
HELDOUT_FILE: Final = "heldout.jsonl"
HELDOUT_SCORED: Final = 500  # held-out sentences the report's perplexity scores
CORPUS_ENGLISH: Final = 10_000
"""English sentences in corpus.jsonl beside the facts: the covariance corpus holds the
language and the subjects' facts, as Wikipedia does for the original ROME/MEMIT statistics
(with English alone, the directions of subject keys go unmeasured and C^-1 k overshoots
along them: docs/methods.md)."""


def covariance_corpus(statements: Sequence[str], english: Sequence[str]) -> list[str]:
    """corpus.jsonl's texts: the first `CORPUS_ENGLISH` English sentences and the
    statements, repeated as often as they fit into the English whole times (at least once),
    so that facts weigh about as much as the language, as a subject's facts recur across
    Wikipedia. On the CounterFact-300 builds, the facts 3 times (instead of once) beside
    10,000 sentences raised ROME's NS from 0.66 to 0.73 on the dev build and from 0.72 to
    0.76 on the held-out one (docs/methods.md)."""
    english = english[:CORPUS_ENGLISH]
    repeats = max(1, len(english) // max(1, len(statements))) if english else 1
    return [*statements * repeats, *english]


def _write_jsonl(path: Path, lines: Sequence[str]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)


class TestbedReport(BaseModel):
    """What a build produced and how well the model knows its facts (testbed.json)."""

    __test__: ClassVar[bool] = False
    model_config = ConfigDict(frozen=True)

    model_dir: str
    source: str = Field(description="Dataset path, or 'synthetic:N:seed'.")
    source_sha256: str | None = None
    seed: int
    config: TestbedConfig
    n_facts: int = Field(description="Requests (rewrite prompts) the model was trained on.")
    n_statements: int
    n_train_tokens: int = Field(description="Tokens in one pass over the statements.")
    vocab_size: int = Field(description="Actual vocabulary size of the trained tokenizer.")
    n_params: int
    recall: float = Field(description="Top-1 first-token recall on the rewrite prompts.")
    paraphrase_recall: float | None = None
    context_recall: float = Field(
        description="Recall on the rewrite prompts after a context fragment ('<words>. ')."
    )
    neighborhood_recall: float | None = None
    steps: int = Field(description="Optimiser steps actually run.")
    stopped_early: bool
    final_loss: float
    tokenizer_seconds: float
    train_seconds: float = Field(description="Wall seconds of the training loop (with evals).")
    total_seconds: float = Field(description="Wall seconds of the whole build.")
    cpu_seconds: float = Field(description="Process CPU seconds of the whole build.")
    torch_threads: int
    torch_version: str
    history: list[RecallPoint]
    case_ids: list[int]
    unknown_case_ids: list[int] = Field(description="Facts whose first token is not top-1.")
    split_sizes: dict[SplitName, int] | None = Field(
        default=None, description="Requests per split of splits.json; None: built unsplit."
    )
    n_support: int = Field(
        default=0, description="Support records learned, never edited (support.jsonl)."
    )
    english: str | None = Field(default=None, description="English text trained on, if any.")
    heldout_perplexity: float | None = Field(
        default=None, description="Perplexity on the held-out English (heldout.jsonl)."
    )


def _tokenizer_and_rows(
    requests: Sequence[EditRequest],
    statements: list[str],
    config: TestbedConfig,
    english: Sequence[str] = (),
) -> tuple[PreTrainedTokenizerFast, PackedRows]:
    """A BPE tokenizer trained on `statements` and `english` (every target a single piece
    where it can be), and both packed into training rows."""
    targets = sorted(
        {t for r in requests for t in (r.target_new, r.target_true) if t}
        | {n.target for r in requests for n in r.neighborhood_prompts}
    )
    tokenizer = train_tokenizer(
        [*statements, *english], config.vocab_size, config.n_positions, targets
    )
    (dot_id,) = tokenizer.encode(".", add_special_tokens=False)
    rows = PackedRows(
        [tokenizer.encode(s, add_special_tokens=False) for s in statements],
        [tokenizer.encode(" " + s, add_special_tokens=False) for s in statements],
        seq_len=config.seq_len,
        eos_id=tokenizer.eos_token_id,
        dot_id=dot_id,
        context_prob=config.context_prob,
        generator=torch.Generator().manual_seed(config.seed),
        english=tokenizer(list(english), add_special_tokens=False)["input_ids"] if english else [],
        english_share=config.english_share,
    )
    return tokenizer, rows


def _statements(requests: Sequence[EditRequest], max_phrasings: int) -> list[str]:
    """The facts of `requests` as text, each also in up to `max_phrasings` other phrasings
    of its relation (found across `requests`), deduplicated in first-seen order."""
    statements = fact_statements(requests)
    if max_phrasings:
        phrasings = relation_phrasings(requests)
        for request in requests:
            truth = spaced(request.target_true or "")
            statements += [p + truth for p in subject_phrasings(request, phrasings, max_phrasings)]
    return list(dict.fromkeys(statements))


def _write_inputs(
    out: Path,
    requests: Sequence[EditRequest],
    statements: list[str],
    splits: RequestSplits | None,
) -> None:
    """The requests (JSONL), the corpus of statements and the splits (if any), beside the
    model."""
    _write_jsonl(out / REQUESTS_FILE, [r.to_json() for r in requests])
    _write_jsonl(
        out / CORPUS_FILE, [json.dumps({"text": s}, ensure_ascii=False) for s in statements]
    )
    if splits is not None:
        write_splits(out, splits, requests)


def _recall_fields(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    requests: Sequence[EditRequest],
    statements: list[str],
) -> dict[str, Any]:
    """The report's recall fields: first-token recall of the rewrite prompts (bare and after
    a context fragment), the paraphrases and the neighbours, and the facts not recalled."""
    prompts, targets = [r.filled_prompt for r in requests], [r.target_true or "" for r in requests]
    hits = first_token_hits(model, tokenizer, prompts, targets)
    in_context = first_token_hits(
        model, tokenizer, in_context_prompts(prompts, statements), targets
    )
    para = [(p, r.target_true or "") for r in requests for p in r.paraphrase_prompts]
    near = [(n.prompt, n.target) for r in requests for n in r.neighborhood_prompts]
    return {
        "recall": mean_or_none(hits) or 0.0,
        "paraphrase_recall": pair_recall(model, tokenizer, para),
        "context_recall": mean_or_none(in_context) or 0.0,
        "neighborhood_recall": pair_recall(model, tokenizer, near),
        "unknown_case_ids": [r.case_id for r, hit in zip(requests, hits, strict=True) if not hit],
    }


def build_testbed(
    out_dir: str | Path,
    requests: Sequence[EditRequest],
    config: TestbedConfig | None = None,
    *,
    seed: int | None = None,
    source: str = "requests",
    source_sha256: str | None = None,
    progress: bool = True,
    split: SplitSpec | None = None,
    support: Sequence[EditRequest] = (),
    english: EnglishText | None = None,
) -> TestbedReport:
    """Train a tokenizer and a tiny GPT-2 on the true facts of `requests`; save to `out_dir`.

    `support` records are learned too but never edited (`closure`: they make every
    target_new something the model says); they go to support.jsonl. With `english`, the
    model also learns its training sentences (`config.english_share` of the items), the
    corpus (covariance) is `covariance_corpus` of the facts and those sentences, and the
    held-out sentences go to heldout.jsonl.

    `seed` (when given) overrides `config.seed`. `source` names where the requests came
    from (a dataset path or "synthetic:N:seed"); when it is an existing file and no
    `source_sha256` is given, the file's sha256 is recorded. Returns the report (also saved
    as testbed.json, last). `split` also writes splits.json (`testbed.splits`; made before
    training, so an impossible split fails fast; the model still learns every fact). Raises
    TestbedError for no requests, a request without target_true or an impossible split.
    Existing files in `out_dir` are overwritten, an earlier splits.json removed; training
    saves its state at each recall check, so a killed build run again with the same inputs
    resumes (`checkpoint`) and ends with the weights an uninterrupted build would have.
    """
    config = config or TestbedConfig.for_facts(len(requests))
    if seed is not None:
        config = config.model_copy(update={"seed": seed})
    if source_sha256 is None and Path(source).is_file():
        source_sha256 = file_sha256(source)
    if not requests:
        raise TestbedError("build_testbed needs at least one request")
    splits = split_requests(requests, split) if split is not None else None
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (REPORT_FILE, SPLITS_FILE, *map(split_requests_file, SPLIT_NAMES)):
        (out / stale).unlink(missing_ok=True)
    statements = _statements([*requests, *support], config.max_phrasings)
    english_train = english.train if english is not None else []
    tokenizer, rows = _tokenizer_and_rows(requests, statements, config, english_train)
    tokenizer_seconds = time.perf_counter() - t_start
    eos_id = tokenizer.eos_token_id
    assert eos_id == 0, "the BPE trainer puts the first special token at id 0"

    rewrite = ([r.filled_prompt for r in requests], [r.target_true or "" for r in requests])
    checkpoint = TrainingCheckpoint(
        out / CHECKPOINT_FILE,
        build_fingerprint(config.model_dump_json(), tokenizer, statements, english_train),
    )
    with quiet_build():
        model = init_model(config, len(tokenizer), eos_id)
        run = train_model(
            model, tokenizer, rows, rewrite, config, progress=progress, checkpoint=checkpoint
        )
        model.eval()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    _write_inputs(out, requests, covariance_corpus(statements, english_train), splits)
    _write_jsonl(out / SUPPORT_FILE, [r.to_json() for r in support])
    if english is not None:
        _write_jsonl(out / HELDOUT_FILE, [json.dumps({"text": t}) for t in english.heldout])
    report = TestbedReport(
        model_dir=str(out),
        source=source,
        source_sha256=source_sha256,
        seed=config.seed,
        config=config,
        n_facts=len(requests),
        n_statements=len(statements),
        n_train_tokens=rows.n_tokens,
        vocab_size=len(tokenizer),
        n_params=sum(p.numel() for p in model.parameters()),
        **_recall_fields(model, tokenizer, requests, statements),
        steps=run.steps,
        stopped_early=run.stopped_early,
        final_loss=run.final_loss,
        tokenizer_seconds=tokenizer_seconds,
        train_seconds=run.seconds,
        total_seconds=time.perf_counter() - t_start,
        cpu_seconds=time.process_time() - cpu_start,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        history=run.history,
        case_ids=[r.case_id for r in requests],
        split_sizes=splits.sizes() if splits is not None else None,
        n_support=len(support),
        english=english.path if english is not None else None,
        heldout_perplexity=(
            perplexity(model, tokenizer, english.heldout[:HELDOUT_SCORED])
            if english is not None
            else None
        ),
    )
    (out / REPORT_FILE).write_text(report.model_dump_json(indent=1) + "\n", encoding="utf-8")
    checkpoint.remove()
    log.info("testbed %s: recall %.3f after %d steps (%.1f s)",
             out, report.recall, run.steps, report.total_seconds)  # fmt: skip
    return report


def build_synthetic_testbed(
    out_dir: str | Path,
    n: int,
    seed: int,
    config: TestbedConfig | None = None,
    *,
    progress: bool = True,
    split: SplitSpec | None = None,
) -> TestbedReport:
    """Build a testbed on `synthetic_world(n, seed)`; `seed` also seeds training."""
    config = (config or TestbedConfig.for_facts(n)).model_copy(update={"seed": seed})
    source = f"synthetic:{n}:{seed}"
    return build_testbed(
        out_dir, synthetic_world(n, seed), config, source=source, progress=progress, split=split
    )


def load_testbed(model_dir: str | Path) -> tuple[TestbedReport, list[EditRequest]]:
    """The report and the requests of a built testbed directory."""
    path = Path(model_dir)
    report_path = path / REPORT_FILE
    if not report_path.is_file():
        raise FileNotFoundError(
            f"{path}: no {REPORT_FILE}; the testbed build is missing or incomplete (rebuild it)"
        )
    report = TestbedReport.model_validate_json(report_path.read_text(encoding="utf-8"))
    lines = (path / REQUESTS_FILE).read_text(encoding="utf-8").splitlines()
    return report, [EditRequest.model_validate_json(line) for line in lines if line.strip()]
