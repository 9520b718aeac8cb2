# Tables (Parquet + CSV + Markdown), figures (PNG + SVG) and a Markdown summary.


rule evaluation_table:
    input:
        [f"{RESULTS}/eval/{v}/evaluation.parquet" for v in PLAN.variant_names],
    output:
        f"{RESULTS}/evaluation.parquet",
    log:
        f"{RESULTS}/logs/evaluation_table.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli concat --inputs {input} --out {output} > {log} 2>&1"


rule tables:
    input:
        evaluation=f"{RESULTS}/evaluation.parquet",
        masks=PLAN.all_mask_paths(),
    output:
        main=f"{RESULTS}/tables/table3_selectors.md",
        baseline=f"{RESULTS}/tables/table2_baseline.md",
    params:
        masks=PLAN.mask_records_json(),
        anchor=PLAN.anchor_json(),
        boot=config["evaluation"]["bootstrap"],
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/tables.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli tables --evaluation {input.evaluation} --masks '{params.masks}' --anchor '{params.anchor}'"
        " --bootstrap {params.boot} --seed {params.seed} --out-dir $(dirname {output.main}) > {log} 2>&1"


rule figures:
    input:
        evaluation=f"{RESULTS}/evaluation.parquet",
        masks=PLAN.all_mask_paths(),
    output:
        heatmap=report(
            f"{RESULTS}/figures/delta_heatmap_cas.png",
            caption="../report/heatmap.rst",
            category="Emotion control",
        ),
        directory=report(
            directory(f"{RESULTS}/figures/all"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    params:
        masks=PLAN.mask_records_json(),
        anchor=PLAN.anchor_json(),
        boot=config["evaluation"]["bootstrap"],
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/figures.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli figures --evaluation {input.evaluation} --masks '{params.masks}' --anchor '{params.anchor}'"
        " --bootstrap {params.boot} --seed {params.seed} --out-dir {output.directory}"
        " --headline {output.heatmap} > {log} 2>&1"


rule report_md:
    input:
        tables=rules.tables.output.main,
        figures=rules.figures.output.directory,
        human=[PLAN.ab_table, PLAN.ab_figure] if PLAN.ab_source else [],
    output:
        f"{RESULTS}/report.md",
    params:
        human=f"--ab-table {PLAN.ab_table} --ab-figure {PLAN.ab_figure}" if PLAN.ab_source else "",
    log:
        f"{RESULTS}/logs/report.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli report --tables-dir $(dirname {input.tables}) --figures-dir {input.figures}"
        " {params.human} --out {output} > {log} 2>&1"
