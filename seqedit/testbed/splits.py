"""Train / validation / test splits of a testbed's edit requests, no subject in two splits.

Trained editors (MEND, SERAC) learn from edit requests, pick their settings on others and
are scored on a third set; hparams tuned on the validation split leave a test split that no
tuning decision saw. Test edits must be about subjects the editor never saw, so requests
are split by subject: every request about one subject (the exact, case-sensitive
`EditRequest.subject` string) lands in the same split. The testbed model itself is still
trained on ALL facts (it must know a fact for the fact to be edited); only the requests are
split.

The rule (`split_requests`): the distinct subjects are sorted, shuffled with
`random.Random(seed)`, and taken in that order; each subject's group of requests goes to
the split whose record count is furthest below its target (fraction × total records),
ties to the earlier of train, validation, test. A split only takes a group while it is
below its target, so every split ends within one group (the largest) of its target. A split
with a fraction > 0 that ends up empty (too few subjects) is an error, as are duplicate
case_ids (a split is a list of case_ids).

A built testbed holds the result as `splits.json` (`RequestSplits`) beside
`requests.jsonl`, and each split's requests as `requests-<split>.jsonl` (our JSONL format),
the files `seqedit train --train/--val` and a campaign's `dataset.path` take;
`load_split(model_dir, "test")` returns that split's requests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Final, Literal, cast, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from seqedit.files import write_atomic
from seqedit.schemas.requests import EditRequest
from seqedit.testbed.world import TestbedError

SPLITS_FILE: Final = "splits.json"
SPLITS_VERSION: Final = 1

SplitName = Literal["train", "validation", "test"]
SPLIT_NAMES: Final[tuple[SplitName, ...]] = get_args(SplitName)


class SplitSpec(BaseModel):
    """How to split requests: the share of records per split and the shuffle's seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train: float = Field(default=0.8, ge=0, description="Share of records to train on.")
    validation: float = Field(default=0.1, ge=0, description="Share to tune settings on.")
    test: float = Field(default=0.1, ge=0, description="Share no tuning decision sees.")
    seed: int = Field(default=0, description="Seed of the shuffle of the subjects.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitSpec:
        total = self.train + self.validation + self.test
        if not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-9):
            raise ValueError(
                f"split fractions {self.train}, {self.validation}, {self.test} sum to "
                f"{total:.12g}, not 1"
            )
        return self

    def fraction(self, name: SplitName) -> float:
        """The share of records asked for split `name`."""
        return float(getattr(self, name))

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> SplitSpec:
        """A spec from 'TRAIN,VALIDATION,TEST' (e.g. '0.8,0.1,0.1', as `--split` takes).

        Raises TestbedError, one line, for anything but three numbers ≥ 0 summing to 1.
        """
        parts = [part.strip() for part in text.split(",")]
        try:
            numbers = [float(part) for part in parts]
        except ValueError:
            numbers = []
        if len(numbers) != 3 or not all(math.isfinite(x) for x in numbers):
            raise TestbedError(
                "a split is TRAIN,VALIDATION,TEST: three numbers >= 0 summing to 1, like "
                f"0.8,0.1,0.1; got {text!r}"
            )
        try:
            return cls(**dict(zip(SPLIT_NAMES, numbers, strict=True)), seed=seed)
        except ValidationError as exc:
            reasons = "; ".join(_reason(error) for error in exc.errors())
            raise TestbedError(f"split {text!r}: {reasons}") from None


def _reason(error: ErrorDetails) -> str:
    """One pydantic error as 'field: message' (or the message alone for the model's own)."""
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


class RequestSplits(BaseModel):
    """The result of a split (splits.json): each split's case_ids in the requests' order,
    its number of subjects, and the spec (fractions and seed) that made it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(default=SPLITS_VERSION, description="Format version of splits.json.")
    spec: SplitSpec
    train: list[int] = Field(description="case_ids of the train split, in request order.")
    validation: list[int] = Field(description="case_ids of the validation split.")
    test: list[int] = Field(description="case_ids of the test split.")
    n_subjects: dict[SplitName, int] = Field(description="Distinct subjects per split.")

    def case_ids(self, name: SplitName) -> list[int]:
        """The case_ids of split `name`, in the order of the requests."""
        return list(getattr(self, name))

    def sizes(self) -> dict[SplitName, int]:
        """Records per split."""
        return {name: len(self.case_ids(name)) for name in SPLIT_NAMES}


def split_requests(requests: Sequence[EditRequest], spec: SplitSpec) -> RequestSplits:
    """Split `requests` by subject into train / validation / test (the rule: module doc).

    Raises TestbedError for duplicate case_ids, and for a split with a fraction > 0 that
    too few subjects leave empty (the message says how many subjects there are).
    """
    groups: dict[str, list[int]] = {}
    seen: set[int] = set()
    for request in requests:
        if request.case_id in seen:
            raise TestbedError(
                f"case_id {request.case_id} appears twice in the requests; a split lists "
                "case_ids, so they must be unique"
            )
        seen.add(request.case_id)
        groups.setdefault(request.subject, []).append(request.case_id)
    subjects = sorted(groups)
    random.Random(spec.seed).shuffle(subjects)

    target = {name: spec.fraction(name) * len(requests) for name in SPLIT_NAMES}
    count = dict.fromkeys(SPLIT_NAMES, 0)
    asked = [name for name in SPLIT_NAMES if spec.fraction(name) > 0]
    owner: dict[str, SplitName] = {}
    for subject in subjects:
        # furthest below its target; max() keeps the first of equals: train, validation, test
        name = max(asked, key=lambda n: target[n] - count[n])
        owner[subject] = name
        count[name] += len(groups[subject])

    empty = [name for name in SPLIT_NAMES if spec.fraction(name) > 0 and count[name] == 0]
    if empty:
        raise TestbedError(
            f"too few subjects to split: {len(subjects)} distinct subjects in "
            f"{len(requests)} requests leave the {' and '.join(empty)} split(s) empty at "
            f"fractions {spec.train}/{spec.validation}/{spec.test}; use more facts or larger "
            "fractions for the empty split(s)"
        )
    members: dict[SplitName, list[int]] = {name: [] for name in SPLIT_NAMES}
    for request in requests:
        members[owner[request.subject]].append(request.case_id)
    n_subjects = {name: sum(1 for o in owner.values() if o == name) for name in SPLIT_NAMES}
    return RequestSplits(spec=spec, **members, n_subjects=n_subjects)


def split_requests_file(name: SplitName) -> str:
    """The file name of split `name`'s requests in a testbed directory."""
    return f"requests-{name}.jsonl"


def write_splits(
    out_dir: str | Path, splits: RequestSplits, requests: Sequence[EditRequest] = ()
) -> Path:
    """Write `splits` as OUT_DIR/splits.json and, given the split `requests`, each split's
    requests as OUT_DIR/requests-<split>.jsonl (all atomically); returns splits.json's path."""
    out = Path(out_dir)
    by_id = {r.case_id: r for r in requests}
    for name in SPLIT_NAMES if requests else ():
        lines = "".join(by_id[c].to_json() + "\n" for c in splits.case_ids(name))
        write_atomic(out / split_requests_file(name), partial(_write_text, text=lines))
    text = splits.model_dump_json(indent=1) + "\n"
    return write_atomic(out / SPLITS_FILE, partial(_write_text, text=text))


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def load_splits(model_dir: str | Path) -> RequestSplits:
    """The splits.json of a built testbed; FileNotFoundError naming the file if absent."""
    path = Path(model_dir) / SPLITS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no {SPLITS_FILE}; this testbed was built without a split "
            "(rebuild it with `seqedit testbed build ... --split 0.8,0.1,0.1`)"
        )
    try:
        return RequestSplits.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise TestbedError(f"{path}: not a valid {SPLITS_FILE}: {exc}") from exc


def load_split(model_dir: str | Path, name: str) -> list[EditRequest]:
    """The requests of split `name` (train, validation or test) of a built testbed, in the
    order of its requests.jsonl.

    Raises FileNotFoundError (naming the file) when the testbed has no splits.json or no
    requests.jsonl, TestbedError for an unknown split name or a splits.json whose case_ids
    are not in requests.jsonl (written for other requests).
    """
    from seqedit.testbed.build import REQUESTS_FILE  # build imports this module

    splits_path = Path(model_dir) / SPLITS_FILE
    if name not in SPLIT_NAMES:
        raise TestbedError(
            f"{splits_path}: no split {name!r}; the splits are {', '.join(SPLIT_NAMES)}"
        )
    splits = load_splits(model_dir)
    requests_path = Path(model_dir) / REQUESTS_FILE
    if not requests_path.is_file():
        raise FileNotFoundError(f"{requests_path}: missing; the testbed build is incomplete")
    lines = requests_path.read_text(encoding="utf-8").splitlines()
    requests = [EditRequest.model_validate_json(line) for line in lines if line.strip()]
    listed = {c for n in SPLIT_NAMES for c in splits.case_ids(n)}
    known = {r.case_id for r in requests}
    if listed != known:
        odd = sorted(listed ^ known)[:5]
        raise TestbedError(
            f"{splits_path}: its case_ids and those of {requests_path} differ (e.g. {odd}); "
            "the splits were written for other requests (rebuild the testbed with --split)"
        )
    wanted = set(splits.case_ids(cast(SplitName, name)))
    return [r for r in requests if r.case_id in wanted]
