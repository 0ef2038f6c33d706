"""The one base class of the errors seqedit raises on purpose.

Every error that says what the user must fix (a bad spec, record, file, hparam, campaign
directory) derives from `SeqeditError`; the CLI prints such an error as one line naming
what to fix and exits with status 2. Any other exception is a bug or an environment fault
and keeps its traceback.
"""

from __future__ import annotations


class SeqeditError(Exception):
    """An error whose message names the file, record or field at fault and what would fix it."""


class UnknownMethodError(SeqeditError, ValueError):
    """A method name that is not registered; the message lists the registered ones."""
