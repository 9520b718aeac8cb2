# Judges (SPEC §3, §7): one judgement table per (judge, attempts file): emotion label and
# score, per-attempt WER of the decoded text, naturalness where an estimator is configured.


rule judge:
    input:
        attempts=f"{RESULTS}/{{stage}}/attempts/{{part}}.parquet",
        judge=lambda wc: PLAN.judge_inputs(wc.judge),
        manifest=manifest_path(),
    output:
        f"{RESULTS}/judgements/{{judge}}/{{stage}}/{{part}}.parquet",
    params:
        judge=lambda wc: PLAN.judge_json(wc.judge),
        naturalness=PLAN.naturalness_json(),
        under_test=PLAN.model_path(),
    log:
        f"{RESULTS}/logs/judge/{{judge}}/{{stage}}/{{part}}.log",
    wildcard_constraints:
        stage="sample|eval/[^/]+",
        judge="[A-Za-z0-9_-]+",
    threads: 1
    resources:
        gpu=lambda wc: PLAN.judge_gpus(wc.judge),
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/judge.yaml"
    shell:
        "python -m esn_core.cli judge --judge {params.judge:q} --naturalness {params.naturalness:q}"
        " --model-under-test {params.under_test:q} --manifest {input.manifest:q} --attempts {input.attempts:q}"
        " --out {output:q} > {log:q} 2>&1"
