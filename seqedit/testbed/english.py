"""General English for a testbed that is a language model, not only a fact table.

The text is `english_wordnet.txt` (151,665 sentences built from WordNet 3.0: definitions and
usage examples, shuffled, one a line; its license notice, LICENSE-wordnet.txt, travels with
it). It does not ship with the package: `find_english` looks for it in `$SEQEDIT_ENGLISH`,
then in `shared/data/` beside the working directory or beside the source checkout (the
project's `../shared`). `EnglishText.load` cuts it into a held-out part (the first lines:
perplexity and fluency) and a training part (the next lines: language-model training and
the covariance corpus), so no held-out sentence is ever trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Final

from pydantic import BaseModel, ConfigDict

from seqedit.errors import SeqeditError

ENGLISH_FILE: Final = "english_wordnet.txt"
ENGLISH_ENV: Final = "SEQEDIT_ENGLISH"
_SEARCHED: Final = ("shared/data", "../shared/data")


class EnglishTextError(SeqeditError, ValueError):
    """No usable English text: not found, unreadable or too short (names the file)."""


def english_candidates() -> list[Path]:
    """Where `find_english` looks, in order (the environment variable first, if set)."""
    roots = [Path.cwd(), Path(__file__).resolve().parents[2]]
    places = [root / sub / ENGLISH_FILE for root in roots for sub in _SEARCHED]
    env = os.environ.get(ENGLISH_ENV)
    return [Path(env), *places] if env else places


def find_english() -> Path | None:
    """The first existing English text of `english_candidates()`, or None."""
    return next((path for path in english_candidates() if path.is_file()), None)


class EnglishText(BaseModel):
    """An English text file cut into held-out and training sentences (file order)."""

    __test__: ClassVar[bool] = False
    model_config = ConfigDict(frozen=True)

    path: str
    heldout: list[str]
    train: list[str]

    @classmethod
    def load(cls, path: str | Path, *, n_heldout: int, n_train: int) -> EnglishText:
        """The first `n_heldout` non-empty lines held out, the next `n_train` for training.

        Raises EnglishTextError naming the file when it is missing, not UTF-8 or shorter
        than `n_heldout + n_train` sentences.
        """
        source = Path(path)
        wanted = n_heldout + n_train
        lines: list[str] = []
        try:
            with source.open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        lines.append(line.strip())
                        if len(lines) == wanted:
                            break
        except FileNotFoundError:
            raise EnglishTextError(f"{source}: no such English text file") from None
        except UnicodeDecodeError as err:
            raise EnglishTextError(f"{source}: not UTF-8 text ({err.reason})") from None
        if len(lines) < wanted:
            raise EnglishTextError(
                f"{source}: {len(lines)} sentences, the testbed wants {n_heldout} held out "
                f"+ {n_train} for training"
            )
        return cls(path=str(source), heldout=lines[:n_heldout], train=lines[n_heldout:])
