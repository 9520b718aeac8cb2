"""Several LALMs in one run (issue 19): the `models:` form, per-model trees and resources,
the rerun contract for adding and removing a model, and the cross-model Tables 2-3 and Fig. 9.

Two planted models of different depth stand in for the paper's three LALMs: they differ in
layer count, which is what the per-model paths and the Fig. 9 panels must keep apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
import yaml

from esn_core.cross_model import table2_models, table3_models
from esn_core.io import read_frame, read_provenance
from esn_core.workflow import Plan, RunPlan
from test_workflow import REPO, _config, _planned_rules, _snakemake, _workdir

# The smallest run with a Table 3 (cas + random) and a Fig. 9 per model.
FAST = {
    "corpus": {"demo": {"speakers": 3, "utterances": 8}},
    "evaluation": {"max_sources": 1, "bootstrap": 20, "interventions": []},
    "selection": {"rates": [0.0118]},
}


def _entry(layers: int | None = None, **extra) -> dict:
    entry = {"adapter": "planted", "path": None, "batch_size": 32, "shard_sources": 4, "threads": 1, "gpus": 1,
             "mem_mb": 3000, "runtime_min": 30, **extra}
    if layers is not None:
        entry["plant_layers"] = layers
    return entry


def _models_config(models: dict) -> dict:
    config = _config(**FAST)
    config["model"] = None
    config["models"] = models
    return config


TWO = {"deep": _entry(), "shallow": _entry(6, mem_mb=2500)}  # 8 and 6 decoder layers
THREE = {**TWO, "tiny": _entry(4)}


def _dry_run_outputs(workdir: Path, config: dict) -> list[str]:
    """The output files of every job `snakemake -n` plans (the checkpoint has run)."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = _snakemake(workdir, "-n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = []
    for line in proc.stdout.splitlines():
        match = re.match(r"\s+output: (.*)$", line)
        if match:
            out += [p.strip() for p in match.group(1).split(",")]
    return out


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> Path:
    workdir = _workdir(tmp_path_factory.mktemp("models"), _models_config(TWO))
    (workdir / "config.yaml").write_text(yaml.safe_dump(_models_config(TWO), sort_keys=False))
    proc = _snakemake(workdir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return workdir


def test_each_model_has_its_own_tree_depth_and_report(two_models):
    results = two_models / "results"
    assert (results / "corpus/manifest.parquet").is_file()  # shared
    assert not (results / "sample").exists() and not (results / "masks").exists()  # nothing model-dependent outside
    for name, layers in (("deep", 8), ("shallow", 6)):
        tree = results / "lalm" / name
        mask = tree / "masks/embedded/tau0.15/c50/lm/cas_r0.0118.parquet"
        assert len(read_provenance(mask)["layer_sizes"]) == layers, name
        assert (tree / "report.md").read_text().startswith("# ESN results")
        assert (tree / "figures/delta_heatmap_cas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        attempts = read_frame(tree / "sample/attempts/shard0.parquet")
        assert all((two_models / p).is_file() and f"lalm/{name}/" in p for p in attempts["audio_path"])


def test_cross_model_tables_lay_models_out_as_in_the_paper(two_models):
    results = two_models / "results"
    per = {n: results / "lalm" / n / "tables" for n in TWO}
    table3 = read_frame(results / "tables/table3_selectors_models.parquet")
    # row groups: each model's own Table 3, in config order, under a `model` column
    assert table3["model"].to_list() == [n for n in TWO for _ in range(2)]
    for name, tables in per.items():
        own = read_frame(tables / "table3_selectors.parquet")
        assert table3.filter(pl.col("model") == name).drop("model").equals(own), name
    # column groups: Table 2's rows once, each model's columns prefixed by its name
    table2 = read_frame(results / "tables/table2_baseline_models.parquet")
    own2 = {n: read_frame(t / "table2_baseline.parquet") for n, t in per.items()}
    assert table2.columns[:2] == ["split", "target_emotion"]
    assert table2.columns[2:] == [f"{n}.{c}" for n in TWO for c in own2[n].columns[2:]]
    for name, own in own2.items():
        mine = table2.select("split", "target_emotion", *[pl.col(f"{name}.{c}").alias(c) for c in own.columns[2:]])
        assert mine.equals(own), name
    md = (results / "tables/table3_selectors_models.md").read_text()
    assert md.count("| deep |") == 2 and md.count("| shallow |") == 2


def test_cross_model_figure_has_a_panel_per_model_with_its_own_layers(two_models):
    results = two_models / "results"
    assert (results / "figures/layers_models.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "one panel per model" in (results / "figures/captions/layers_models.rst").read_text()
    report = (results / "report.md").read_text()
    for name in TWO:
        assert f"## {name}: headline (anchor intervention)" in report
        assert f"(lalm/{name}/report.md)" in report
    assert "![layers_models](figures/layers_models.png)" in report


def test_adding_a_model_runs_only_its_jobs_and_removing_it_only_the_cross_outputs(two_models):
    assert _planned_rules(two_models, _models_config(TWO)) == {}
    planned = _dry_run_outputs(two_models, _models_config(THREE))
    cross = {"results/report.md", "results/figures/layers_models.png"}
    assert planned and any("lalm/tiny/sample/" in p for p in planned), planned
    outside = [p for p in planned if not p.startswith("results/lalm/tiny/") and not p.startswith("results/tables/")
               and p not in cross]
    assert not outside, outside  # no job of deep / shallow, no corpus, no judge calibration
    proc = _snakemake(two_models)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert read_frame(two_models / "results/tables/table3_selectors_models.parquet")["model"].unique().len() == 3
    # removing one: only the cross-model outputs are redone
    assert _planned_rules(two_models, _models_config(TWO)) == {"cross_model": 1, "all": 1}
    planned = _dry_run_outputs(two_models, _models_config(TWO))
    assert sorted(planned) == sorted(["results/tables/table2_baseline_models.md",
                                      "results/tables/table3_selectors_models.md", *cross]), planned
    # one model left: no cross-model outputs to make, nothing else to redo
    assert _planned_rules(two_models, _models_config({"deep": TWO["deep"]})) == {}
    (two_models / "config.yaml").write_text(yaml.safe_dump(_models_config(TWO), sort_keys=False))


def test_judge_jobs_take_their_judges_resources_and_changing_them_reruns_nothing(two_models):
    # up to date first, whatever an earlier test left to redo (e.g. the cross outputs)
    (two_models / "config.yaml").write_text(yaml.safe_dump(_models_config(TWO), sort_keys=False))
    done = _snakemake(two_models)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    config = _models_config(TWO)
    config["judges"]["available"] = [{"name": "embedded", "kind": "embedded", "mem_mb": 1234,
                                      "runtime_min": 7, "gpus": 2}]
    try:
        assert _planned_rules(two_models, config) == {}  # resources are not a judgement's input
        proc = _snakemake(two_models, "-n", "--forcerun", "judge")
    finally:
        (two_models / "config.yaml").write_text(yaml.safe_dump(_models_config(TWO), sort_keys=False))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    judged = [block for block in re.split(r"\n(?=rule )", proc.stdout) if block.startswith("rule judge:")]
    assert len(judged) >= 2  # at least one judge job per model
    for block in judged:
        resources = re.search(r"resources: (.*)", block).group(1).split(", ")
        assert {"mem_mb=1234", "runtime=7", "gpu=2"} <= set(resources), resources
    # without them: the defaults (the embedded judge needs no GPU)
    default = Plan(_models_config(TWO), model="deep")
    assert (default.judge_gpus("embedded"), default.judge_mem_mb("embedded"),
            default.judge_runtime_min("embedded")) == (0, 8000, 120)


def test_model_jobs_take_their_models_resources(two_models, tmp_path):
    # `snakemake -n` prints each planned job's resources; both models' jobs are replanned by
    # forcing the GPU rules, and each shows its own mem_mb / runtime / gpu / threads.
    models = {"deep": _entry(), "shallow": _entry(6, mem_mb=2500, runtime_min=45, gpus=0, threads=2)}
    (two_models / "config.yaml").write_text(yaml.safe_dump(_models_config(models), sort_keys=False))
    proc = _snakemake(two_models, "-n", "--forcerun", "sample", "evaluate", "-p")
    (two_models / "config.yaml").write_text(yaml.safe_dump(_models_config(TWO), sort_keys=False))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    blocks = re.split(r"\n(?=rule )", proc.stdout)
    seen = set()
    for block in blocks:
        rule = re.match(r"rule (\w+):", block)
        model = re.search(r"wildcards: .*model=(\w+)", block)
        if not rule or rule.group(1) not in ("sample", "evaluate") or not model:
            continue
        name = model.group(1)
        resources = re.search(r"resources: (.*)", block).group(1)
        want = {"deep": ("mem_mb=3000", "runtime=30", "gpu=1"), "shallow": ("mem_mb=2500", "runtime=45", "gpu=0")}[name]
        assert all(w in resources.split(", ") for w in want), (name, resources)
        assert f"--threads {models[name]['threads']}" in block, block
        seen.add((rule.group(1), name))
    assert seen == {(r, n) for r in ("sample", "evaluate") for n in models}, seen


# ---------------------------------------------------------------------------- plan and config


def test_single_model_form_keeps_todays_paths():
    config = _config()
    run, plan = RunPlan(config), Plan(config)
    assert not run.multi and run.names == ["planted"] and run.pattern("sample/x.parquet") == "results/sample/x.parquet"
    assert plan.results == "results" and plan.model_inputs() == ["results/models/planted/config.json"]
    assert plan.sample_shards("attempts", 1) == ["results/sample/attempts/shard0.parquet"]
    assert run.targets()[:2] == ["results/report.md", "results/tables/table3_selectors.md"]


def test_models_form_puts_model_dependent_paths_under_the_model_name():
    run = RunPlan(_models_config(TWO))
    assert run.multi and run.names == ["deep", "shallow"] and run.cross_model
    assert run.pattern("sample/x.parquet") == "results/lalm/{model}/sample/x.parquet"
    shallow = run.plans["shallow"]
    assert shallow.model_path() == "results/lalm/shallow/models/planted" and shallow.plant_layers == 6
    assert shallow.judge_inputs("embedded") == ["results/judges/embedded.json"]  # shared, not per model
    assert shallow.all_mask_paths()[0].startswith("results/lalm/shallow/masks/")
    assert "--demo-tree results/corpus/demo_esd" in shallow.corpus_args()
    assert run.targets()[-1] == "results/report.md"
    assert not RunPlan(_models_config({"deep": TWO["deep"]})).cross_model


@pytest.mark.parametrize(
    "override,expected",
    [
        ({"models": TWO}, "give either model: (one LALM) or models: (several), not both"),
        ({"model": None, "models": {"q": {"adapter": "qwen2_5_omni", "batch_size": 1, "shard_sources": 1}}},
         "models.q.path: required for adapter 'qwen2_5_omni'"),
        ({"model": None, "models": {"p": {"adapter": "planted", "path": "/nowhere", "plant_layers": 6,
                                          "batch_size": 1, "shard_sources": 1}}},
         "models.p.plant_layers: only for adapter 'planted' without a path"),
        ({"model": None, "models": {"bad name": TWO["deep"]}}, "bad name"),
    ],
    ids=["both-forms", "path-per-model", "plant-layers", "model-name"],
)
def test_models_config_errors_name_the_model_before_any_job(tmp_path, override, expected):
    config = _config(**FAST)
    config.update(override)
    workdir = _workdir(tmp_path, config)
    proc = _snakemake(workdir, "-n")
    assert proc.returncode != 0 and expected in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert not (workdir / "results").exists()


def test_listener_files_are_refused_with_several_models(tmp_path):
    answers = tmp_path / "labels.csv"
    answers.write_text("attempt_id,human_label\n")
    config = _models_config(TWO)
    config["success"]["human_labels"] = str(answers)
    with pytest.raises(ValueError, match="success.human_labels: listener files are not supported with models:"):
        RunPlan(config)


def test_shipped_two_model_config_plans_both_models_and_the_cross_outputs(tmp_path):
    workdir = _workdir(tmp_path, _config())
    (workdir / "config").mkdir()
    (workdir / "config/two_models.yaml").write_text((REPO / "config/two_models.yaml").read_text())
    proc = _snakemake(workdir, "-n", "--quiet", "rules", "--configfile", "config/two_models.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"^cross_model\s+1$", out, re.M) and re.search(r"^tables\s+2$", out, re.M), out


# ---------------------------------------------------------------------------- table layout, hand-made


def test_table2_models_joins_rows_and_prefixes_columns():
    a = pl.DataFrame({"split": ["all", "all"], "target_emotion": ["happy", "avg"], "match_e": [50.0, 40.0]})
    b = pl.DataFrame({"split": ["all", "all", "all"], "target_emotion": ["happy", "sad", "avg"],
                      "match_e": [75.0, 25.0, 50.0]})
    got = table2_models({"a": a, "b": b})
    assert got.columns == ["split", "target_emotion", "a.match_e", "b.match_e"]
    # rows in first-appearance order; a model without a row shows null, not a shifted value
    assert got.rows() == [("all", "happy", 50.0, 75.0), ("all", "avg", 40.0, 50.0), ("all", "sad", None, 25.0)]


def test_table3_models_stacks_row_groups_in_the_order_given():
    a = pl.DataFrame({"selector": ["random", "cas"], "self_e": [0.0, 30.0]})
    b = pl.DataFrame({"selector": ["cas"], "self_e": [10.0], "mos_mean": [3.5]})
    got = table3_models({"b": b, "a": a})
    assert got.columns == ["model", "selector", "self_e", "mos_mean"]
    assert got.rows() == [("b", "cas", 10.0, 3.5), ("a", "random", 0.0, None), ("a", "cas", 30.0, None)]
