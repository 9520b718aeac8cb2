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
        "python -m esn_core.cli concat --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule tables:
    input:
        evaluation=f"{RESULTS}/evaluation.parquet",
        masks=PLAN.all_mask_paths(),
    output:
        main=f"{RESULTS}/tables/table3_selectors.md",
        baseline=f"{RESULTS}/tables/table2_baseline.md",
        # the two tables every run has, bundled by `snakemake --report` beside the figures
        selectors_csv=report(
            f"{RESULTS}/tables/table3_selectors.csv",
            caption="../report/table3.rst",
            category="Tables",
        ),
        baseline_csv=report(
            f"{RESULTS}/tables/table2_baseline.csv",
            caption="../report/table2.rst",
            category="Tables",
        ),
    params:
        masks=PLAN.mask_records_json(),
        anchor=PLAN.anchor_json(),
        boot=config["evaluation"]["bootstrap"],
        seed=config["seed"],
        out_dir=lambda wc, output: os.path.dirname(output.main),
    log:
        f"{RESULTS}/logs/tables.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli tables --evaluation {input.evaluation:q} --masks {params.masks:q} --anchor {params.anchor:q}"
        " --bootstrap {params.boot} --seed {params.seed} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule figures:
    input:
        evaluation=f"{RESULTS}/evaluation.parquet",
        masks=PLAN.all_mask_paths(),
    output:
        heatmap=report(
            f"{RESULTS}/figures/delta_heatmap_{PLAN.anchor_selector}.png",
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
        "python -m esn_core.cli figures --evaluation {input.evaluation:q} --masks {params.masks:q} --anchor {params.anchor:q}"
        " --bootstrap {params.boot} --seed {params.seed} --out-dir {output.directory:q}"
        " --headline {output.heatmap:q} > {log:q} 2>&1"


rule report_md:
    input:
        tables=rules.tables.output.main,
        figures=rules.figures.output.directory,
        human=[PLAN.ab_table, PLAN.ab_figure] if PLAN.ab_source else [],
    output:
        f"{RESULTS}/report.md",
    params:
        tables_dir=lambda wc, input: os.path.dirname(input.tables),
        human=PLAN.ab_report_args(),
    log:
        f"{RESULTS}/logs/report.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli report --tables-dir {params.tables_dir:q} --figures-dir {input.figures:q}"
        " {params.human} --out {output:q} > {log:q} 2>&1"
