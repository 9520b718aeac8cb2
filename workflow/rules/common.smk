# Shared by every rule: config validation, paths, and the variants the config asks for.
import os

from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

from esn_core.config_checks import check_config  # noqa: E402  (after validation: clear errors first)
from esn_core.workflow import RunPlan  # noqa: E402

# What the schema cannot check (adapter and judge signatures, paths that must exist), with
# the key path, so that `snakemake -n` catches it.
check_config(config)

# One Plan per model (RUN.of(wildcards)); RUN.pattern(...) is a per-model path: today's path
# with `model:`, results/lalm/{model}/... with `models:`.
RUN = RunPlan(config)
RESULTS = RUN.results

if RUN.multi:

    wildcard_constraints:
        model=RUN.model_constraint(),


def manifest_path():
    return f"{RESULTS}/corpus/manifest.parquet"


def shards_of(wc):
    """The job's model's shards per split, read from the manifest once the corpus checkpoint has run."""
    plan = RUN.of(wc)
    manifest = checkpoints.corpus.get().output.manifest
    return lambda split: plan.n_shards(manifest, split)
