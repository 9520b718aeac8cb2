# Shared by every rule: config validation, paths, and the variants the config asks for.
import os

from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

from esn_core.config_checks import check_config  # noqa: E402  (after validation: clear errors first)
from esn_core.workflow import Plan  # noqa: E402

# What the schema cannot check (adapter and judge signatures, paths that must exist), with
# the key path, so that `snakemake -n` catches it.
check_config(config)

PLAN = Plan(config)
RESULTS = PLAN.results


def manifest_path():
    return f"{RESULTS}/corpus/manifest.parquet"


def n_shards(split):
    """Shards of a split, read from the manifest once the corpus checkpoint has run."""
    manifest = checkpoints.corpus.get().output.manifest
    return PLAN.n_shards(manifest, split)
