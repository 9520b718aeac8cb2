# Human evaluation (SPEC §7, paper §5.4): the listening kit, the import of listener files
# (A/B answers -> Fig. 8; labels -> the judge "human", whose success sets, probs and masks
# give CAS-H in Tables 3 and 5), and simulated listeners for the embedded default.
# Listener files are inputs: editing, adding or removing one reruns what depends on it.


rule human_label_items:
    input:
        attempts=lambda wc: PLAN.sample_shards("attempts", n_shards("identification")),
    output:
        PLAN.label_key,
    params:
        per_emotion=PLAN.human.get("label_per_emotion", 50),
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/human/label_items.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli label-items --attempts {input.attempts:q} --per-emotion {params.per_emotion}"
        " --seed {params.seed} --out {output:q} > {log:q} 2>&1"


rule listening_kit:
    input:
        attempts=lambda wc: PLAN.eval_shards(PLAN.kit_variant.name, n_shards),
        label_key=PLAN.label_key,
    output:
        kit=directory(PLAN.kit_dir),
        key=PLAN.ab_key,
    params:
        selector=config["evaluation"]["anchor"]["selector"],
        pairs=PLAN.human.get("pairs_per_emotion", 25),
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/human/kit.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli kit --attempts {input.attempts:q} --label-key {input.label_key:q}"
        " --selector {params.selector} --pairs-per-emotion {params.pairs} --seed {params.seed}"
        " --out-dir {output.kit:q} --key {output.key:q} > {log:q} 2>&1"


rule simulate_listeners:
    input:
        ab_key=PLAN.ab_key,
        label_key=PLAN.label_key,
        judgements=lambda wc: PLAN.simulation_judgements(n_shards),
    output:
        directory(PLAN.simulated_dir),
    params:
        listeners=(PLAN.simulate or {}).get("listeners", 20),
        noise=(PLAN.simulate or {}).get("noise", 0.2),
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/human/simulate_listeners.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli simulate-listeners --ab-key {input.ab_key:q} --label-key {input.label_key:q}"
        " --judgements {input.judgements:q} --listeners {params.listeners} --noise {params.noise}"
        " --seed {params.seed} --out-dir {output:q} > {log:q} 2>&1"


if PLAN.human_labels_source:

    rule import_human_labels:
        input:
            answers=PLAN.human_label_inputs(),
            label_key=PLAN.label_key,
            attempts=lambda wc: PLAN.sample_shards("attempts", n_shards("identification")),
        output:
            PLAN.human_labels_table,
        log:
            f"{RESULTS}/logs/human/import_labels.log",
        threads: 1
        resources:
            mem_mb=1000,
            runtime=5,
        conda:
            "../../envs/stats.yaml"
        shell:
            "python -m esn_core.cli import-labels --answers {input.answers:q} --label-key {input.label_key:q}"
            " --attempts {input.attempts:q} --out {output:q} > {log:q} 2>&1"


if PLAN.ab_source:

    rule import_ab:
        input:
            answers=PLAN.ab_inputs(),
            ab_key=PLAN.ab_key,
        output:
            answers=f"{RESULTS}/human/ab_answers.parquet",
            table=PLAN.ab_table,
            figure=report(PLAN.ab_figure, caption="../report/ab.rst", category="Human evaluation"),
        params:
            boot=config["evaluation"]["bootstrap"],
            seed=config["seed"],
        log:
            f"{RESULTS}/logs/human/import_ab.log",
        threads: 1
        resources:
            mem_mb=1000,
            runtime=5,
        conda:
            "../../envs/stats.yaml"
        shell:
            "python -m esn_core.cli import-ab --answers {input.answers:q} --ab-key {input.ab_key:q}"
            " --bootstrap {params.boot} --seed {params.seed} --out {output.answers:q}"
            " --table {output.table:q} --figure {output.figure:q} > {log:q} 2>&1"
