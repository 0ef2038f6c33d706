"""seqedit: large-scale sequential knowledge editing of language models on Ray."""

__version__ = "0.1.0"
