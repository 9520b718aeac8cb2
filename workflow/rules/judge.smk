# Judges (SPEC §3, §7): one judgement table per (judge, attempts file): emotion label and
# score, per-attempt WER of the decoded text, naturalness where an estimator is configured.


rule judge:
    input:
        attempts=RUN.pattern("{stage}/attempts/{part}.parquet"),
        judge=lambda wc: RUN.of(wc).judge_inputs(wc.judge),
        manifest=manifest_path(),
    output:
        RUN.pattern("judgements/{judge}/{stage}/{part}.parquet"),
    params:
        judge=lambda wc: RUN.of(wc).judge_json(wc.judge),
        naturalness=RUN.single.naturalness_json(),
        under_test=lambda wc: RUN.of(wc).model_path(),
    log:
        RUN.pattern("logs/judge/{judge}/{stage}/{part}.log"),
    wildcard_constraints:
        stage="sample|eval/[^/]+",
        judge="[A-Za-z0-9_-]+",
    threads: 1
    resources:
        gpu=lambda wc: RUN.of(wc).judge_gpus(wc.judge),
        mem_mb=lambda wc: RUN.of(wc).judge_mem_mb(wc.judge),
        runtime=lambda wc: RUN.of(wc).judge_runtime_min(wc.judge),
    conda:
        "../../envs/judge.yaml"
    shell:
        "python -m esn_core.cli judge --judge {params.judge:q} --naturalness {params.naturalness:q}"
        " --model-under-test {params.under_test:q} --manifest {input.manifest:q} --attempts {input.attempts:q}"
        " --out {output:q} > {log:q} 2>&1"
