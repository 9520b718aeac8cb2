# ESD tree (or the generated demo corpus) -> manifest; the planted model and the embedded
# judge of the embedded default.


checkpoint corpus:
    output:
        manifest=f"{RESULTS}/corpus/manifest.parquet",
    params:
        args=RUN.single.corpus_args(),
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


# The planted model of each planted entry without a path; a model's plant_layers picks its
# depth. The command is fixed per form (models: always passes --layers), so adding or removing
# a model never changes it; the single-model form keeps its command unless it sets plant_layers.
if RUN.multi or RUN.any_plan(lambda p: p.plant_layers is not None):

    rule plant_model:
        output:
            config=RUN.pattern("models/planted/config.json"),
            truth=RUN.pattern("models/planted/ground_truth.parquet"),
        params:
            seed=config["seed"],
            layers=lambda wc: RUN.of(wc).plant_layers or 8,
            out=lambda wc, output: os.path.dirname(output.config),
        log:
            RUN.pattern("logs/plant_model.log"),
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        conda:
            "../../envs/gpu.yaml"
        shell:
            "python -m esn_core.cli plant --seed {params.seed} --layers {params.layers} --out {params.out:q}"
            " > {log:q} 2>&1"

else:

    rule plant_model:
        output:
            config=RUN.pattern("models/planted/config.json"),
            truth=RUN.pattern("models/planted/ground_truth.parquet"),
        params:
            seed=config["seed"],
            out=lambda wc, output: os.path.dirname(output.config),
        log:
            RUN.pattern("logs/plant_model.log"),
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
