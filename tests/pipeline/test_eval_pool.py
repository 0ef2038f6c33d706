"""The evaluator pool beside the editor: any number of evaluators write the same rows, a
dead evaluator is replaced, and evaluation rows a dead driver never wrote are recomputed."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from seqedit.pipeline.campaign_dir.parts import list_parts
from seqedit.pipeline.cli.campaign_ops import status_table
from seqedit.pipeline.results.views import query
from seqedit.pipeline.run.driver import run_campaign
from seqedit.pipeline.run.eval_plan import build_task, due_tasks, part_number, shard_plan
from seqedit.pipeline.run.eval_pool import EvalPool
from seqedit.schemas.campaign import load_spec
from seqedit.testbed.build import load_testbed
from tests.pipeline.specs import write_spec
from tests.pipeline.test_campaign_integration import assert_same_rows

N_EDITS = 10


def _spec_file(tmp_path: Path, testbed: Path, stats: Path, actors: int) -> Path:
    evaluation = {
        "actors": actors,
        "chunk": 4,
        "immediate": True,
        "fluency_records": 1,
        "resources": {"num_cpus": 0.5, "torch_threads": 1},
    }
    folder = tmp_path / f"spec{actors}"
    folder.mkdir()
    return write_spec(folder, testbed, stats, name="pool", n_edits=N_EDITS, shard_size=5,
                      eval_every=5, evaluation=evaluation)  # fmt: skip


@pytest.mark.slow
def test_two_evaluators_write_what_one_writes_and_lost_rows_are_recomputed(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    one = load_spec(_spec_file(tmp_path, tiny_testbed, tiny_stats, actors=1))
    two = load_spec(_spec_file(tmp_path, tiny_testbed, tiny_stats, actors=2))
    assert run_campaign(one, tmp_path / "one").status == "done"
    assert run_campaign(two, tmp_path / "two").status == "done"
    assert_same_rows(tmp_path / "two", tmp_path / "one")

    sql = ("SELECT protocol, n_edits_applied, edit_step, fluency FROM evals "
           "ORDER BY protocol, n_edits_applied, edit_step")  # fmt: skip
    rows = query(tmp_path / "two", sql).to_pylist()
    immediate = [r for r in rows if r["protocol"] == "immediate"]
    assert [(r["edit_step"], r["n_edits_applied"]) for r in immediate] == [
        (step, step + 1) for step in range(N_EDITS)
    ]  # each record scored right after its own edit
    points = sorted({(r["protocol"], r["n_edits_applied"]) for r in rows} - {
        ("immediate", r["n_edits_applied"]) for r in immediate})  # fmt: skip
    assert points == [("final", 10), ("retention", 5)]
    sampled = [r for r in rows if r["fluency"] is not None]
    assert [(r["protocol"], r["n_edits_applied"]) for r in sampled] == [
        ("final", 10), ("retention", 5)]  # fmt: skip

    # a driver that died before its evaluators answered: the part is missing; a rerun
    # recomputes exactly the missing rows and nothing else
    lost = list_parts(tmp_path / "two", "evals", 0, 0)[-1]
    lost.unlink()
    kept = {p.name for p in list_parts(tmp_path / "two", "evals", 0, 0)}
    # shard 0: immediate blocks of steps 0-3 and 4, retention at 5 in 2 chunks of <= 4;
    # shard 1: immediate 5-8 and 9, final at 10 in 3 chunks
    assert len(kept) + 1 == 4
    assert _evals_column(tmp_path / "two") == ["3/4", "5/5"]
    assert run_campaign(two, tmp_path / "two").status == "done"
    assert _evals_column(tmp_path / "two") == ["4/4", "5/5"]
    assert {p.name for p in list_parts(tmp_path / "two", "evals", 0, 0)} == kept | {lost.name}
    assert_same_rows(tmp_path / "two", tmp_path / "one")


def _evals_column(campaign: Path) -> list[str]:
    """`seqedit status`'s evals column: written/planned evaluation tasks per shard."""
    return status_table(campaign)[1].column("evals").to_pylist()


def test_plan_gives_every_task_its_own_part(tiny_testbed: Path, tiny_stats: Path,
                                            tmp_path: Path) -> None:  # fmt: skip
    spec = load_spec(_spec_file(tmp_path, tiny_testbed, tiny_stats, actors=1))
    _, requests = load_testbed(tiny_testbed)
    planned = [(p.part, build_task(spec, requests, p))
               for p in shard_plan(spec, 0, 5) + shard_plan(spec, 5, 10)]  # fmt: skip
    parts = [part for part, _ in planned]
    assert len(set(parts)) == len(parts) and 0 not in parts
    # immediate blocks of chunk 4 within each shard of 5 steps: 0-3, 4, 5-8, 9
    immediate = [t.edit_steps for _, t in planned if t.protocol == "immediate"]
    assert immediate == [[0, 1, 2, 3], [4], [5, 6, 7, 8], [9]]
    stop = due_tasks(spec, requests, 2, shard_start=0, shard_stop=5, stopped=True)
    assert [(t.protocol, len(t.requests)) for _, t in stop] == [("immediate", 3),
                                                               ("retention", 3)]  # fmt: skip
    assert part_number(2, 2, 0) != part_number(2, 1)


def test_a_dead_evaluator_is_replaced_and_its_tasks_resubmitted(
    ray_local: None, tiny_testbed: Path, tiny_stats: Path, tmp_path: Path
) -> None:
    spec = load_spec(_spec_file(tmp_path, tiny_testbed, tiny_stats, actors=1))
    _, requests = load_testbed(tiny_testbed)
    (_, task), *_ = due_tasks(spec, requests, 4, shard_start=0, shard_stop=5)
    task = task.model_copy(update={"scored_after": [0] * len(task.requests)})  # base model
    pool = EvalPool(spec, heldout=[])
    try:
        pool.submit(task, "first")
        ((tag, expected),) = pool.drain()
        ray.kill(pool.actors.handles[0])
        pool.submit(task, "again")
        ((tag, result),) = pool.drain()
        assert (tag, pool.actors.deaths, pool.actors.resubmitted) == ("again", 1, 1)
        assert result.rows == expected.rows
    finally:
        pool.close()
