# ESN pipeline: neutral ESD speech -> activation statistics -> emotion-sensitive neuron
# masks -> steered evaluation -> the paper's tables and figures. See README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/corpus.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/judge.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/human.smk"


rule all:
    default_target: True
    input:
        RUN.targets(),
