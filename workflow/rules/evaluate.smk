# Stage 4 (SPEC §6-7): baseline + every selector x mask emotion x target on the test splits.
# All cells of one source run in one batch through per-row masks. A variant directory name
# spells out judge, tau_wer, c, group, r, method, alpha and the selectors it compares (sorted,
# so reordering selection.selectors reruns nothing).


rule evaluate:
    input:
        manifest=manifest_path(),
        model=lambda wc: RUN.of(wc).model_inputs(),
        masks=lambda wc: RUN.of(wc).variant(wc.variant).mask_paths(),
    output:
        RUN.pattern("eval/{variant}/attempts/{split}/shard{shard}.parquet"),
    params:
        model=lambda wc: RUN.of(wc).model_json(),
        masks=lambda wc: RUN.of(wc).variant(wc.variant).mask_args(),
        group=lambda wc: RUN.of(wc).variant(wc.variant).group,
        method=lambda wc: RUN.of(wc).variant(wc.variant).method,
        alpha=lambda wc: RUN.of(wc).variant(wc.variant).alpha,
        shard_size=lambda wc: RUN.of(wc).model["shard_sources"],
        max_sources=RUN.single.max_sources_arg(),
        batch=lambda wc: RUN.of(wc).model["batch_size"],
        seed=config["seed"],
        audio=lambda wc: f"{RUN.of(wc).results}/eval/{wc.variant}/audio/{wc.split}",
    log:
        RUN.pattern("logs/eval/{variant}/{split}/shard{shard}.log"),
    wildcard_constraints:
        split="test_seen|test_unseen|development",
    threads: lambda wc: RUN.of(wc).threads
    resources:
        gpu=lambda wc: RUN.of(wc).gpus,
        mem_mb=lambda wc: RUN.of(wc).model_mem_mb,
        runtime=lambda wc: RUN.of(wc).model_runtime_min,
    conda:
        "../../envs/gpu.yaml"
    shell:
        "python -m esn_core.cli evaluate --manifest {input.manifest:q} --model {params.model:q} --split {wildcards.split}"
        " --shard {wildcards.shard} --shard-size {params.shard_size} {params.max_sources}"
        " --masks {params.masks:q} --group {params.group} --method {params.method} --alpha {params.alpha}"
        " --batch-size {params.batch} --seed {params.seed} --threads {threads}"
        " --audio-dir {params.audio:q} --out {output:q} > {log:q} 2>&1"


rule collect_variant:
    input:
        attempts=lambda wc: RUN.of(wc).eval_shards(wc.variant, shards_of(wc)),
        judgements=lambda wc: RUN.of(wc).eval_judgements(wc.variant, shards_of(wc)),
    output:
        RUN.pattern("eval/{variant}/evaluation.parquet"),
    params:
        variant=lambda wc: RUN.of(wc).variant(wc.variant).to_json(),
        judges=" ".join(RUN.single.report_judges),
    log:
        RUN.pattern("logs/eval/{variant}/collect.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli collect --variant {params.variant:q} --judges {params.judges}"
        " --attempts {input.attempts:q} --judgements {input.judgements:q} --out {output:q} > {log:q} 2>&1"
