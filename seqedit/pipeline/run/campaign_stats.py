"""A campaign's covariance stats: found in `stats`, or built there from `stats_build`.

Found stats are used only if they are what the campaign would build: the same model, the
method's layers at its rewrite modules, and (when `stats_build` says which) the same
corpus, the same `until_stable`. Anything else is refused with the field that differs;
nothing is rebuilt over a stats directory that holds other stats. With
`stats_build.until_stable`, the probes are `probes` of the campaign's own requests (and
AlphaEdit's P k is watched at its `nullspace_threshold`). `stats` may be a local path or
any storage URI (`s3://bucket/stats?...`), read and written through `seqedit.storage`.
"""

from __future__ import annotations

import logging

from transformers import AutoConfig

from seqedit.methods.arch import module_names_for_type
from seqedit.methods.config import validate_config
from seqedit.methods.registry import get_method
from seqedit.pipeline.run.stats_job import build_stats_sharded
from seqedit.pipeline.run.stats_until_stable import UntilStable
from seqedit.schemas.campaign import CampaignSpec
from seqedit.schemas.requests import EditRequest
from seqedit.storage import Location, location
from seqedit.workers.corpus import corpus_fingerprint
from seqedit.workers.stats import META_FILE, StatsConfig, StatsMeta, StatsStoreError
from seqedit.workers.stats_store import load_stats

log = logging.getLogger(__name__)


def ensure_campaign_stats(spec: CampaignSpec, requests: list[EditRequest]) -> None:
    """Make `spec.stats` hold the stats the campaign's method needs (if it needs any):
    check the ones there, or build them from `spec.stats_build` (sharded, resumable;
    `requests`: the campaign's, the probes of `until_stable`)."""
    method = get_method(spec.method)
    config = validate_config(method.config_cls, spec.hparams, where=f"campaign {spec.name!r}")
    build = spec.stats_build
    if build is None or spec.stats is None or not method.uses_second_moment(config):
        return
    stats_dir, layers = location(spec.stats), method.layers(config)
    model_type = AutoConfig.from_pretrained(spec.model, local_files_only=True).model_type
    names = config.module_names or module_names_for_type(model_type)
    stats_config = StatsConfig(
        layers=layers,
        corpus=build.corpus,
        text_column=build.text_column,
        module_tmp=names.rewrite_module_tmp,
        batch_size=build.batch_size,
        max_length=build.max_length,
        dtype=build.dtype,
        n_samples=build.n_samples,
        seed=build.seed,
    )
    if (stats_dir / META_FILE).is_file():
        _check_found(stats_dir, spec, stats_config)
        log.info("campaign %s: using the stats in %s", spec.name, stats_dir)
        return
    rule = None
    if build.until_stable is not None:
        threshold = getattr(config, "nullspace_threshold", None)
        rule = UntilStable.of_requests(build.until_stable, requests, build.probes, threshold)
    log.info("campaign %s: building the stats of layers %s in %s", spec.name, layers, stats_dir)
    build_stats_sharded(spec.model, stats_config, stats_dir, shards=build.shards,
                        actors=build.actors, resources=build.resources,
                        progress=False, until_stable=rule)  # fmt: skip


def _check_found(stats_dir: Location, spec: CampaignSpec, config: StatsConfig) -> None:
    """Refuse stats that are not the ones `config` would build for this model."""
    # checks the model, the layers, the file's checksum and that the sidecar describes it
    load_stats(stats_dir, layers=config.layers, model_dir=spec.model,
               module_tmp=config.module_tmp)  # fmt: skip
    meta = StatsMeta.model_validate_json((stats_dir / META_FILE).read_text(encoding="utf-8"))
    wanted = corpus_fingerprint(config.corpus, text_column=config.text_column)
    if meta.corpus_fingerprint != wanted:
        raise StatsStoreError(
            f"{stats_dir / META_FILE}: corpus_fingerprint {meta.corpus_fingerprint[:12]} "
            f"(from {', '.join(meta.corpus_files)}) is not that of stats_build.corpus "
            f"({wanted[:12]}); point `stats:` at another directory to build new stats"
        )
    for field in ("n_samples", "seed", "dtype"):
        if getattr(meta, field) != getattr(config, field):
            raise StatsStoreError(
                f"{stats_dir / META_FILE}: {field} is {getattr(meta, field)!r}, stats_build "
                f"asks for {getattr(config, field)!r}; point `stats:` at another directory"
            )
    found = (meta.until_stable or {}).get("eps")
    wanted_eps = spec.stats_build.until_stable if spec.stats_build else None
    if found != wanted_eps:
        raise StatsStoreError(
            f"{stats_dir / META_FILE}: until_stable.eps is {found!r}, stats_build asks for "
            f"{wanted_eps!r}; point `stats:` at another directory"
        )
