# ESD tree (or the generated demo corpus) -> manifest; the planted model and the embedded
# judge of the embedded default.


checkpoint corpus:
    output:
        manifest=f"{RESULTS}/corpus/manifest.parquet",
    params:
        args=PLAN.corpus_args(),
    log:
        f"{RESULTS}/logs/corpus.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli corpus {params.args} --threads {threads} --out {output.manifest:q} > {log:q} 2>&1"


rule plant_model:
    output:
        config=f"{RESULTS}/models/planted/config.json",
        truth=f"{RESULTS}/models/planted/ground_truth.parquet",
    params:
        seed=config["seed"],
        out=lambda wc, output: os.path.dirname(output.config),
    log:
        f"{RESULTS}/logs/plant_model.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/gpu.yaml"
    shell:
        "python -m esn_core.cli plant --seed {params.seed} --out {params.out:q} > {log:q} 2>&1"


rule calibrate_embedded_judge:
    input:
        manifest=manifest_path(),
    output:
        judge=f"{RESULTS}/judges/embedded.json",
    log:
        f"{RESULTS}/logs/calibrate_embedded_judge.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli calibrate-judge --manifest {input.manifest:q} --out {output.judge:q} > {log:q} 2>&1"
