# Human evaluation (SPEC §7, paper §5.4): the listening kit, the import of listener files
# (A/B answers -> Fig. 8; labels -> the judge "human", whose success sets, probs and masks
# give CAS-H in Tables 3 and 5), and simulated listeners for the embedded default.
# Listener files are inputs: editing, adding or removing one reruns what depends on it.


rule human_label_items:
    input:
        attempts=lambda wc: RUN.of(wc).sample_shards("attempts", shards_of(wc)("identification")),
    output:
        RUN.pattern("human/label_key.parquet"),
    params:
        per_emotion=RUN.single.human.get("label_per_emotion", 50),
        seed=config["seed"],
    log:
        RUN.pattern("logs/human/label_items.log"),
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
        attempts=lambda wc: RUN.of(wc).eval_shards(RUN.of(wc).kit_variant.name, shards_of(wc)),
        label_key=RUN.pattern("human/label_key.parquet"),
    output:
        kit=directory(RUN.pattern("human/kit")),
        key=RUN.pattern("human/ab_key.parquet"),
    params:
        selector=config["evaluation"]["anchor"]["selector"],
        pairs=RUN.single.human.get("pairs_per_emotion", 25),
        seed=config["seed"],
    log:
        RUN.pattern("logs/human/kit.log"),
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
        ab_key=RUN.pattern("human/ab_key.parquet"),
        label_key=RUN.pattern("human/label_key.parquet"),
        judgements=lambda wc: RUN.of(wc).simulation_judgements(shards_of(wc)),
    output:
        directory(RUN.pattern("human/simulated")),
    params:
        listeners=(RUN.single.simulate or {}).get("listeners", 20),
        noise=(RUN.single.simulate or {}).get("noise", 0.2),
        seed=config["seed"],
    log:
        RUN.pattern("logs/human/simulate_listeners.log"),
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


if RUN.single.human_labels_source:

    rule import_human_labels:
        input:
            answers=lambda wc: RUN.of(wc).human_label_inputs(),
            label_key=RUN.pattern("human/label_key.parquet"),
            attempts=lambda wc: RUN.of(wc).sample_shards("attempts", shards_of(wc)("identification")),
        output:
            RUN.pattern("human/labels.parquet"),
        log:
            RUN.pattern("logs/human/import_labels.log"),
        threads: 1
        resources:
            mem_mb=1000,
            runtime=5,
        conda:
            "../../envs/stats.yaml"
        shell:
            "python -m esn_core.cli import-labels --answers {input.answers:q} --label-key {input.label_key:q}"
            " --attempts {input.attempts:q} --out {output:q} > {log:q} 2>&1"


if RUN.single.ab_source:

    rule import_ab:
        input:
            answers=lambda wc: RUN.of(wc).ab_inputs(),
            ab_key=RUN.pattern("human/ab_key.parquet"),
        output:
            answers=RUN.pattern("human/ab_answers.parquet"),
            table=RUN.pattern("tables/fig8_ab.parquet"),
            figure=report(
                RUN.pattern("figures/human/ab_preference.png"), caption="../report/ab.rst", category="Human evaluation"
            ),
        params:
            boot=config["evaluation"]["bootstrap"],
            seed=config["seed"],
        log:
            RUN.pattern("logs/human/import_ab.log"),
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
