# Stage 1 (SPEC §2): identification-split conversions with activation capture, sharded over
# sources. Depends on the corpus and the model only: no judge, threshold, cap or selector
# reaches these jobs, so changing those never reruns sampling.


rule sample:
    input:
        manifest=manifest_path(),
        model=PLAN.model_inputs(),
    output:
        attempts=f"{RESULTS}/sample/attempts/shard{{shard}}.parquet",
        counts=[f"{RESULTS}/sample/counts/{g}/shard{{shard}}.parquet" for g in PLAN.capture_groups],
    params:
        model=PLAN.model_json(),
        counts=lambda wc: [f"{g}={RESULTS}/sample/counts/{g}/shard{wc.shard}.parquet" for g in PLAN.capture_groups],
        shard_size=config["model"]["shard_sources"],
        batch=config["model"]["batch_size"],
        positions=config["capture"]["count_positions"],
        moments="--moments" if config["capture"]["moments"] else "",
        seed=config["seed"],
        audio=f"{RESULTS}/sample/audio",
    log:
        f"{RESULTS}/logs/sample/shard{{shard}}.log",
    threads: config["model"]["threads"]
    resources:
        gpu=PLAN.gpus,
        mem_mb=PLAN.model_mem_mb,
        runtime=PLAN.model_runtime_min,
    conda:
        "../../envs/gpu.yaml"
    shell:
        "python -m esn_core.cli sample --manifest {input.manifest:q} --model {params.model:q} --split identification"
        " --shard {wildcards.shard} --shard-size {params.shard_size} --batch-size {params.batch}"
        " --count-positions {params.positions} {params.moments} --seed {params.seed}"
        " --threads {threads} --audio-dir {params.audio:q} --attempts {output.attempts:q}"
        " --counts {params.counts:q} > {log:q} 2>&1"
