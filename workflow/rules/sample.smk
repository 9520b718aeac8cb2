# Stage 1 (SPEC §2): identification-split conversions with activation capture, sharded over
# sources. Depends on the corpus and the model only: no judge, threshold, cap or selector
# reaches these jobs, so changing those never reruns sampling. Threads, batch size, shard
# size and GPU resources are the job's model's own (models.<name> or model).


rule sample:
    input:
        manifest=manifest_path(),
        model=lambda wc: RUN.of(wc).model_inputs(),
    output:
        attempts=RUN.pattern("sample/attempts/shard{shard}.parquet"),
        counts=[RUN.pattern(f"sample/counts/{g}/shard{{shard}}.parquet") for g in RUN.single.capture_groups],
    params:
        model=lambda wc: RUN.of(wc).model_json(),
        counts=lambda wc: [
            f"{g}={RUN.of(wc).results}/sample/counts/{g}/shard{wc.shard}.parquet" for g in RUN.single.capture_groups
        ],
        shard_size=lambda wc: RUN.of(wc).model["shard_sources"],
        batch=lambda wc: RUN.of(wc).model["batch_size"],
        positions=config["capture"]["count_positions"],
        moments="--moments" if config["capture"]["moments"] else "",
        seed=config["seed"],
        audio=lambda wc: f"{RUN.of(wc).results}/sample/audio",
    log:
        RUN.pattern("logs/sample/shard{shard}.log"),
    threads: lambda wc: RUN.of(wc).threads
    resources:
        gpu=lambda wc: RUN.of(wc).gpus,
        mem_mb=lambda wc: RUN.of(wc).model_mem_mb,
        runtime=lambda wc: RUN.of(wc).model_runtime_min,
    conda:
        "../../envs/gpu.yaml"
    shell:
        "python -m esn_core.cli sample --manifest {input.manifest:q} --model {params.model:q} --split identification"
        " --shard {wildcards.shard} --shard-size {params.shard_size} --batch-size {params.batch}"
        " --count-positions {params.positions} {params.moments} --seed {params.seed}"
        " --threads {threads} --audio-dir {params.audio:q} --attempts {output.attempts:q}"
        " --counts {params.counts:q} > {log:q} 2>&1"
