"""The fact testbed: a tiny GPT-2 trained from scratch to really know a set of facts.

`synthetic_world(n, seed)` invents CounterFact-like edit requests; `build_testbed`
(or `build_synthetic_testbed` / `build_dataset_testbed`) trains a tokenizer and model on
their true facts and writes a standard Hugging Face model directory with `testbed.json`
(the `TestbedReport`) and `requests.jsonl` (the requests, for a campaign to edit).
"""

from seqedit.testbed.build import (
    TestbedConfig,
    TestbedReport,
    build_synthetic_testbed,
    build_testbed,
    first_token_hits,
    load_testbed,
)
from seqedit.testbed.dataset import build_dataset_testbed
from seqedit.testbed.world import fact_statements, synthetic_world, write_counterfact

__all__ = [
    "TestbedConfig",
    "TestbedReport",
    "build_dataset_testbed",
    "build_synthetic_testbed",
    "build_testbed",
    "fact_statements",
    "first_token_hits",
    "load_testbed",
    "synthetic_world",
    "write_counterfact",
]
