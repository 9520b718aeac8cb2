# Tables (Parquet + CSV + Markdown), figures (PNG + SVG) and a Markdown summary.


rule evaluation_table:
    input:
        lambda wc: [f"{RUN.of(wc).results}/eval/{v}/evaluation.parquet" for v in RUN.of(wc).variant_names],
    output:
        RUN.pattern("evaluation.parquet"),
    log:
        RUN.pattern("logs/evaluation_table.log"),
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
        evaluation=RUN.pattern("evaluation.parquet"),
        masks=lambda wc: RUN.of(wc).all_mask_paths(),
    output:
        main=RUN.pattern("tables/table3_selectors.md"),
        baseline=RUN.pattern("tables/table2_baseline.md"),
        # the two tables every run has, bundled by `snakemake --report` beside the figures
        selectors_csv=report(
            RUN.pattern("tables/table3_selectors.csv"),
            caption="../report/table3.rst",
            category="Tables",
        ),
        baseline_csv=report(
            RUN.pattern("tables/table2_baseline.csv"),
            caption="../report/table2.rst",
            category="Tables",
        ),
    params:
        masks=lambda wc: RUN.of(wc).mask_records_json(),
        anchor=RUN.single.anchor_json(),
        boot=config["evaluation"]["bootstrap"],
        seed=config["seed"],
        out_dir=lambda wc, output: os.path.dirname(output.main),
    log:
        RUN.pattern("logs/tables.log"),
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
        evaluation=RUN.pattern("evaluation.parquet"),
        masks=lambda wc: RUN.of(wc).all_mask_paths(),
    output:
        heatmap=report(
            RUN.pattern(f"figures/delta_heatmap_{RUN.single.anchor_selector}.png"),
            caption="../report/heatmap.rst",
            category="Emotion control",
        ),
        directory=report(
            directory(RUN.pattern("figures/all")),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    params:
        masks=lambda wc: RUN.of(wc).mask_records_json(),
        anchor=RUN.single.anchor_json(),
        boot=config["evaluation"]["bootstrap"],
        seed=config["seed"],
    log:
        RUN.pattern("logs/figures.log"),
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
        human=lambda wc: [RUN.of(wc).ab_table, RUN.of(wc).ab_figure] if RUN.of(wc).ab_source else [],
    output:
        RUN.pattern("report.md"),
    params:
        tables_dir=lambda wc, input: os.path.dirname(input.tables),
        human=lambda wc: RUN.of(wc).ab_report_args(),
    log:
        RUN.pattern("logs/report.log"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m esn_core.cli report --tables-dir {params.tables_dir:q} --figures-dir {input.figures:q}"
        " {params.human} --out {output:q} > {log:q} 2>&1"


# Several models: Tables 2 and 3 side by side, Fig. 9 with one panel per model (each its own
# layer count) and a report with each model's headline. Removing a model reruns only this.
# The tables' .md stand for their Parquet twins, which the same per-model job writes.
if RUN.cross_model:

    rule cross_model:
        input:
            tables=RUN.expand("tables/table3_selectors.md"),
            baselines=RUN.expand("tables/table2_baseline.md"),
            masks=list(RUN.anchor_masks().values()),
        output:
            table2=f"{RUN.cross_tables_dir}/table2_baseline_models.md",
            table3=f"{RUN.cross_tables_dir}/table3_selectors_models.md",
            figure=report(RUN.cross_figure, caption="../report/layers_models.rst", category="Models"),
            report=RUN.cross_report,
        params:
            tables=RUN.cross_args(RUN.per_model("tables")),
            masks=RUN.cross_args(RUN.anchor_masks()),
            anchor=RUN.single.anchor_json(),
            out_dir=lambda wc, output: os.path.dirname(output.table2),
        log:
            f"{RESULTS}/logs/cross_model.log",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        conda:
            "../../envs/stats.yaml"
        shell:
            "python -m esn_core.cli cross-model --tables {params.tables:q} --masks {params.masks:q}"
            " --anchor {params.anchor:q} --out-dir {params.out_dir:q} --figure {output.figure:q}"
            " --report {output.report:q} > {log:q} 2>&1"
