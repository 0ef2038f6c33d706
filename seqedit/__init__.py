"""seqedit: large-scale sequential knowledge editing of language models on Ray."""

__version__ = "0.1.0"

_API = {"Campaign", "EasyEditor", "EditOutcome", "edit"}


def __getattr__(name: str) -> object:
    """`seqedit.Campaign`, `seqedit.edit`, ...: the Python API, imported on first use (so
    that `import seqedit` stays light for the command line)."""
    if name in _API:
        from seqedit import api

        return getattr(api, name)
    raise AttributeError(f"module 'seqedit' has no attribute {name!r}")
