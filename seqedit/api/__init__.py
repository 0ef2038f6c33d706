"""seqedit from Python: `Campaign`, `edit` and the EasyEdit-shaped `EasyEditor`
(docs/python.md)."""

from seqedit.api.campaign import Campaign
from seqedit.api.easyedit import EasyEditor
from seqedit.api.editing import EditOutcome, edit

__all__ = ["Campaign", "EasyEditor", "EditOutcome", "edit"]
