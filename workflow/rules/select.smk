# Stages 2-3 (SPEC §3-5): success sets -> activation probabilities -> masks. Paths carry the
# judge, tau_wer, cap c, group, selector and rate, so variants sit side by side and a change
# of any of them reruns only what follows from it.


rule success:
    input:
        attempts=lambda wc: RUN.of(wc).sample_shards("attempts", shards_of(wc)("identification")),
        judgements=lambda wc: RUN.of(wc).sample_judgements(wc.judge, shards_of(wc)("identification")),
    output:
        RUN.pattern("success/{judge}/tau{tau}/c{cap}.parquet"),
    params:
        seed=config["seed"],
        human=lambda wc: RUN.of(wc).human_labels_arg(wc.judge),
    log:
        RUN.pattern("logs/success/{judge}/tau{tau}/c{cap}.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli success --attempts {input.attempts:q} --judgements {input.judgements:q} {params.human}"
        " --judge {wildcards.judge} --tau {wildcards.tau} --cap {wildcards.cap} --seed {params.seed} --out {output:q}"
        " > {log:q} 2>&1"


rule probs:
    input:
        success=RUN.pattern("success/{judge}/tau{tau}/c{cap}.parquet"),
        counts=lambda wc: RUN.of(wc).sample_shards(f"counts/{wc.group}", shards_of(wc)("identification")),
    output:
        RUN.pattern("probs/{judge}/tau{tau}/c{cap}/{group}.parquet"),
    log:
        RUN.pattern("logs/probs/{judge}/tau{tau}/c{cap}/{group}.log"),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli probs --success {input.success:q} --counts {input.counts:q} --out {output:q} > {log:q} 2>&1"


rule masks:
    input:
        RUN.pattern("probs/{judge}/tau{tau}/c{cap}/{group}.parquet"),
    output:
        RUN.pattern("masks/{judge}/tau{tau}/c{cap}/{group}/{selector}_r{rate}.parquet"),
    params:
        seed=config["seed"],
        percentile=config["selection"]["lape_percentile"],
        emotions=" ".join(config["selection"]["emotions"]),
    log:
        RUN.pattern("logs/masks/{judge}/tau{tau}/c{cap}/{group}/{selector}_r{rate}.log"),
    wildcard_constraints:
        selector="lap|lape|mad|cas|random",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli masks --probs {input:q} --selector {wildcards.selector} --rate {wildcards.rate}"
        " --seed {params.seed} --lape-percentile {params.percentile} --emotions {params.emotions}"
        " --out {output:q} > {log:q} 2>&1"
