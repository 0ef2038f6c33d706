"""Shared fixtures: a tiny fact testbed and its covariance, built once per test session."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from seqedit.testbed.build import CORPUS_FILE, TestbedConfig, build_synthetic_testbed
from seqedit.workers.stats import StatsConfig, compute_stats
from seqedit.workers.stats_store import save_stats

# The S3 tests talk to a local moto server; pyarrow (and every Ray worker, which inherits
# this environment) needs some credentials and must not ask a cloud metadata service.
for _name, _value in (
    ("AWS_ACCESS_KEY_ID", "seqedit-test"),
    ("AWS_SECRET_ACCESS_KEY", "seqedit-test"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
):
    os.environ.setdefault(_name, _value)

S3_BUCKET = "seqedit-test"

TINY_FACTS = 40
TINY_LAYER = 0


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer GPT-2 trained on a 40-fact synthetic world (seed 0), as a model dir."""
    out = tmp_path_factory.mktemp("testbed") / "model"
    threads = torch.get_num_threads()
    try:
        build_synthetic_testbed(out, TINY_FACTS, 0, TestbedConfig.tiny(), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def tiny_stats(tiny_testbed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Covariance of the tiny testbed's edited layer (0: where this narrow model edits best)."""
    out = tmp_path_factory.mktemp("stats")
    config = StatsConfig(layers=[TINY_LAYER], corpus=[tiny_testbed / CORPUS_FILE])
    save_stats(out, compute_stats(tiny_testbed, config, progress=False))
    return out


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """host:port of a local S3 server (moto) with the bucket `S3_BUCKET`, for this session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    fs, _ = pafs.FileSystem.from_uri(
        f"s3://{S3_BUCKET}?endpoint_override={endpoint}&scheme=http&allow_bucket_creation=true"
    )
    fs.create_dir(S3_BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def s3_root(s3_endpoint: str) -> str:
    """A fresh, empty S3 folder URI (its own prefix in the session's bucket)."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}?endpoint_override={s3_endpoint}&scheme=http"
