"""Adding a method is one file plus one registry line: `tests/fixtures/methods/attn_step.py`
(an edit of the attention output projection, a module no built-in method edits) registered
by one line of environment, runs through a campaign, the evaluators and `seqedit rebuild`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from seqedit.methods.registry import PLUGINS_VARIABLE, get_method
from seqedit.methods.scoring import score_targets
from seqedit.pipeline.campaign_dir.state import CampaignState
from seqedit.pipeline.cli.campaign_ops import rebuild_model
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import run_campaign
from seqedit.schemas.campaign import load_spec
from seqedit.testbed.build import load_testbed
from seqedit.workers.model_io import load_model
from tests.pipeline.specs import write_spec

ROOT = Path(__file__).parents[2]
PLUGIN = "tests.fixtures.methods.attn_step:ATTN_STEP"


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one registry line, for this process and the Ray workers it starts."""
    monkeypatch.setenv(PLUGINS_VARIABLE, PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def test_an_unloadable_plugin_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLUGINS_VARIABLE, "no_such_module:X")
    with pytest.raises(ValueError, match="SEQEDIT_METHODS: cannot load 'no_such_module:X'"):
        get_method("rome")


@pytest.mark.slow
def test_a_method_in_one_file_runs_through_campaign_evaluator_and_rebuild(
    plugin: None, tiny_testbed: Path, tmp_path: Path
) -> None:
    assert get_method("attn-step").name == "attn-step"
    spec_file = write_spec(
        tmp_path, tiny_testbed, None, method="attn-step",
        hparams={"layer": 1, "steps": 4, "lr": 0.5, "rank": 4},
        n_edits=4, shard_size=2, eval_every=2,
    )  # fmt: skip
    ray.shutdown()  # the workers must start with the plugin's environment
    try:
        state = run_campaign(load_spec(spec_file), tmp_path / "c")
    finally:
        ray.shutdown()
    assert state.status == "done"
    campaign = tmp_path / "c"
    modules = query(campaign, "SELECT DISTINCT modules FROM edits").column("modules")
    assert modules.to_pylist() == ["transformer.h.1.attn.c_proj"]

    # the evaluators scored the edited model: rebuild it and score it here
    last = CampaignState.load(campaign).shards[-1]
    fingerprint = rebuild_model(campaign, 3, tmp_path / "rebuilt")
    assert fingerprint == last.weights_fingerprint
    model, tokenizer = load_model(tmp_path / "rebuilt")
    _, requests = load_testbed(tiny_testbed)
    prompts = [r.filled_prompt for r in requests[:4]]
    news = score_targets(model, tokenizer, prompts, [r.target_new for r in requests[:4]])
    trues = score_targets(model, tokenizer, prompts, [r.target_true for r in requests[:4]])
    expected = sum(n.prob > t.prob for n, t in zip(news, trues, strict=True)) / 4
    final = query(campaign, "SELECT avg(es) AS es FROM evals WHERE protocol = 'final'")
    assert final.column("es").to_pylist() == [pytest.approx(expected)]
