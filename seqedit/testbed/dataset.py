"""A testbed from a dataset file: by default a small language model that knows the file's
facts (English beside the facts, support records closing the set under its targets, each
fact in several phrasings of its relation), or the facts-only testbed (`english=None`).
"""

from __future__ import annotations

from pathlib import Path

from seqedit.schemas.requests import EditRequest
from seqedit.testbed.build import TestbedConfig, TestbedReport, build_testbed
from seqedit.testbed.closure import close_under_targets
from seqedit.testbed.english import (
    EnglishText,
    EnglishTextError,
    english_candidates,
    find_english,
)
from seqedit.testbed.splits import SplitSpec


def build_dataset_testbed(
    out_dir: str | Path,
    dataset: str | Path,
    *,
    limit: int | None = None,
    format: str = "auto",
    config: TestbedConfig | None = None,
    english: str | Path | None = "auto",
    seed: int | None = None,
    architecture: str | None = None,
    progress: bool = True,
    split: SplitSpec | None = None,
) -> TestbedReport:
    """Build a testbed on the first `limit` requests of a dataset file (any loader format).

    With English (`english`: a text file, or "auto" for `find_english()`), the testbed is a
    language model: it learns English beside the facts, support records close the set
    under its targets (`closure`, drawn from the rest of the file) and each fact is also
    trained in other phrasings of its relation; the default config is then
    `TestbedConfig.language_model`. `english=None` builds the facts-only testbed. `seed`
    and `architecture` override the config's. Raises EnglishTextError when "auto" finds
    no English text.
    """
    from seqedit.schemas.loaders import load_requests

    everything = load_requests(dataset, format).requests
    requests = everything[:limit] if limit is not None else everything
    text: EnglishText | None = None
    support: list[EditRequest] = []
    if english is not None:
        path = find_english() if english == "auto" else Path(english)
        if path is None:
            looked = ", ".join(str(p) for p in english_candidates())
            raise EnglishTextError(
                f"no English text for the testbed (looked for {looked}); pass --english "
                "FILE, or --english none for a facts-only testbed"
            )
        config = config or TestbedConfig.language_model(len(requests))
        text = EnglishText.load(
            path, n_heldout=config.english_heldout, n_train=config.english_train
        )
        support = close_under_targets(requests, everything[len(requests) :])
    config = config or TestbedConfig.for_facts(len(requests))
    overrides = {"seed": seed, "architecture": architecture}
    config = TestbedConfig.model_validate(
        {**config.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
    )
    return build_testbed(
        out_dir, requests, config, source=str(dataset), progress=progress, split=split,
        support=support, english=text,
    )  # fmt: skip
