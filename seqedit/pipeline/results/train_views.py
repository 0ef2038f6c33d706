"""DuckDB views over a training job's `train` table (`seqedit train`), for `seqedit query`
and `seqedit report` on a training directory as on a campaign.

A training directory holds `job.json` and `train/rows-<step>.parquet` (`TrainRow`, one row
per step, split and metric; a resumed job has removed the parts written after its last
checkpoint, so each step is there once). Views:
- `train`: every row;
- `train_curves`: one row per (split, step) with a column per metric (`loss_total`,
  `edit_acc`, `perplexity_pre` = exp(nll/pre), ...), the shape a plot wants.
"""

from __future__ import annotations

import duckdb
import pyarrow.dataset as ds

from seqedit.schemas.tables import TrainRow, arrow_schema
from seqedit.storage import Location

JOB_FILE, TRAIN_DIR = "job.json", "train"
TRAIN_VIEWS = ("train", "train_curves")

CURVE_METRICS = {
    "loss_total": "loss/total", "loss_edit": "loss/edit", "loss_loc": "loss/loc",
    "edit_acc": "edit/acc", "acc_pre": "acc/pre", "acc_post": "acc/post",
    "nll_pre": "nll/pre", "nll_post": "nll/post", "time_step": "time/step",
    "time_edit": "time/edit",
}  # fmt: skip
"""Column of `train_curves` -> metric name in `train`."""


def is_training_dir(root: Location) -> bool:
    """A `seqedit train` output directory (and not a campaign's)."""
    return (root / JOB_FILE).is_file() and not (root / "state.json").is_file()


def create_train_views(con: duckdb.DuckDBPyConnection, root: Location) -> None:
    """The `train` and `train_curves` views of the training directory `root`."""
    parts = sorted(part.fs_path for part in (root / TRAIN_DIR).glob("rows-*.parquet"))
    data = ds.dataset(parts, schema=arrow_schema(TrainRow), format="parquet", filesystem=root.fs)
    con.register("_parts_train", data)
    con.execute("CREATE VIEW train AS SELECT * FROM _parts_train")
    columns = "".join(
        f"max(value) FILTER (WHERE name = '{metric}') AS {column}, "
        for column, metric in CURVE_METRICS.items()
    )
    con.execute(
        "CREATE VIEW train_curves AS SELECT split, step, max(seconds) AS seconds, "
        f"max(workers) AS workers, {columns}"
        "exp(max(value) FILTER (WHERE name = 'nll/pre')) AS perplexity_pre, "
        "exp(max(value) FILTER (WHERE name = 'nll/post')) AS perplexity_post "
        "FROM train GROUP BY split, step ORDER BY split, step"
    )
