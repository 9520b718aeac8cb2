"""Shared-cluster hardening (issue 18), tested the way a user meets it: `snakemake -n` with a
`--configfile` override over the shipped config.yaml, a real run whose results folder has a
space in its name, and the `esn` commands on real (or deliberately broken) files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from esn_core.corpus import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _workdir(path: Path) -> Path:
    """A copy of the workflow with the shipped config.yaml, as a user's clone has it."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, path)
    for name in ("workflow", "envs", "config"):
        shutil.copytree(REPO / name, path / name, dirs_exist_ok=True)
    return path


def _snakemake(workdir: Path, *args: str, overrides: list[dict] = (), timeout: int = 600):
    files = []
    for k, override in enumerate(overrides):
        f = workdir / f"override{k}.yaml"
        f.write_text(yaml.safe_dump(override))
        files.append(f.name)
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--nocolor", *args]
    if files:
        cmd += ["--configfile", *files]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    return proc, proc.stdout + proc.stderr


def _esn(*args: str, cwd: Path, umask: int | None = None) -> subprocess.CompletedProcess:
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "esn_core.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, preexec_fn=preexec)


def _variants_planned(out: str) -> set[str]:
    """Evaluation variants of a dry run (the collect jobs are in the DAG before the corpus exists)."""
    names = set()
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("output:") and line.endswith("/evaluation.parquet") and "/eval/" in line:
            names.add(line.split("/eval/")[1].split("/")[0])
    return names


# ------------------------------------------------------------------- 1. file modes


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_mode_a_plain_open_gives_under_the_umask(tmp_path, umask):
    pl.DataFrame({"a": [1, 2]}).write_parquet(tmp_path / "in.parquet")
    proc = _esn("concat", "--inputs", "in.parquet", "--out", "out/joined.parquet", cwd=tmp_path, umask=umask)
    assert proc.returncode == 0, proc.stderr
    mode = (tmp_path / "out/joined.parquet").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask, oct(mode)
    assert not list((tmp_path / "out").glob(".*.tmp"))


# ------------------------------------------------- 2. values checked while the DAG is built


@pytest.mark.parametrize(
    "override,expected",
    [
        ({"judges": {"available": [{"name": "embedded", "kind": "embedded"},
                                   {"name": "e2v", "kind": "emotion2vec", "modeldir": "/models/e2v"}]}},
         ["judges.available[e2v]", "modeldir"]),
        ({"judges": {"available": [{"name": "embedded", "kind": "embedded"},
                                   {"name": "e2v", "kind": "emotion2vec"}]}},
         ["judges.available[e2v]", "model_dir"]),
        ({"judges": {"available": [{"name": "embedded", "kind": "embedded"},
                                   {"name": "e2v", "kind": "emotion2vec", "model_dir": "/no/such/e2v"}]}},
         ["judges.available[e2v].model_dir", "/no/such/e2v", "does not exist"]),
        ({"model": {"options": {"bogus_kw": 1}}}, ["model.options.bogus_kw", "PlantedAdapter"]),
        ({"model": {"adapter": "qwen2_5_omni", "path": "Qwen/Qwen2.5-Omni-7B", "options": {"speakr": "Chelsie"}}},
         ["model.options.speakr", "QwenOmniAdapter", "speaker"]),
        ({"model": {"adapter": "minicpm_o_4_5", "path": "openbmb/MiniCPM-o-4_5", "options": {"vocoder_batch_size": 0}}},
         ["model.options.vocoder_batch_size: 0 is not allowed; a whole number >= 1"]),
        ({"model": {"adapter": "minicpm_o_4_5", "path": "openbmb/MiniCPM-o-4_5",
                    "options": {"sampling": {"top_p": 0, "temprature": 0.7}}}},
         ["model.options.sampling.top_p: 0 is not allowed; a number in (0, 1]",
          "model.options.sampling.temprature: not a field of CodeSampling"]),
        ({"model": {"options": {"speech_workers": "two"}}},
         ["model.options.speech_workers: 'two' is not allowed; a whole number >= 1 or null"]),
        ({"corpus": {"source": "esd", "esd_root": "/no/such/ESD"}}, ["corpus.esd_root", "/no/such/ESD"]),
        ({"judges": {"naturalness": {"kind": "utmos", "checkpoint": "/no/such/utmos.pt"}}},
         ["judges.naturalness.checkpoint", "/no/such/utmos.pt"]),
    ],
    ids=["judge-typo-key", "e2v-without-model-dir", "judge-dir-missing", "planted-option", "qwen-option",
         "minicpm-option-value", "minicpm-sampling-values", "planted-option-value", "esd-root-missing", "mos-checkpoint-missing"],
)
def test_config_values_are_checked_by_a_dry_run_with_the_key_path(tmp_path, override, expected):
    workdir = _workdir(tmp_path / "wf")
    proc, out = _snakemake(workdir, "-n", overrides=[override])
    assert proc.returncode != 0, out[-2000:]
    for text in expected:
        assert text in out, (text, out[-3000:])
    assert not (workdir / "results").exists()


def test_valid_options_and_existing_paths_pass_the_dry_run(tmp_path):
    esd = tmp_path / "ESD" / "Emotion Speech Dataset"
    esd.mkdir(parents=True)
    workdir = _workdir(tmp_path / "wf")
    proc, out = _snakemake(workdir, "-n", overrides=[{"model": {"options": {"speech_workers": 2}},
                                                      "corpus": {"source": "esd", "esd_root": str(esd.parent)}}])
    assert proc.returncode == 0, out[-3000:]


# -------------------------------------------- 3. a --configfile override replaces, not merges


def test_override_replaces_the_interventions_and_an_empty_list_means_none(tmp_path):
    workdir = _workdir(tmp_path / "wf")
    proc, out = _snakemake(workdir, "-n")
    assert proc.returncode == 0, out[-2000:]
    shipped = _variants_planned(out)
    assert any("_deactivate_a0_" in v for v in shipped) and any("_steer_a2_" in v for v in shipped), shipped

    proc, out = _snakemake(workdir, "-n", overrides=[{"evaluation": {"interventions": [
        {"method": "steer", "alphas": [1.0]}]}}])
    assert proc.returncode == 0, out[-2000:]
    only_steer = _variants_planned(out)
    assert only_steer and not any("_deactivate_" in v or "_steer_a2_" in v for v in only_steer), only_steer

    proc, out = _snakemake(workdir, "-n", overrides=[{"evaluation": {"interventions": []}}])
    assert proc.returncode == 0, out[-2000:]
    none = _variants_planned(out)
    # only the anchor cell (every selector, both groups) and the r / c sweeps remain
    assert none == only_steer and not any("_add_" in v for v in none), none

    proc, out = _snakemake(workdir, "-n", overrides=[{"evaluation": {"interventions": [
        {"method": "add", "alphas": []}]}}])
    assert proc.returncode != 0 and "evaluation.interventions" in out, out[-2000:]


def test_override_removes_a_judge(tmp_path):
    workdir = _workdir(tmp_path / "wf")
    broken = {"judges": {"available": [{"name": "embedded", "kind": "embedded"},
                                       {"name": "e2v", "kind": "emotion2vec", "model_dir": "/no/such/e2v"}]}}
    proc, out = _snakemake(workdir, "-n", overrides=[broken])
    assert proc.returncode != 0 and "/no/such/e2v" in out
    # a second --configfile that lists the judges again drops e2v (a mapping would have kept it)
    proc, out = _snakemake(workdir, "-n", overrides=[broken, {"judges": {"available": [
        {"name": "embedded", "kind": "embedded"}]}}])
    assert proc.returncode == 0, out[-2000:]


def test_the_old_mapping_form_is_refused_with_the_key(tmp_path):
    workdir = _workdir(tmp_path / "wf")
    proc, out = _snakemake(workdir, "-n", overrides=[{"evaluation": {"interventions": {"steer": [1.0]}}}])
    assert proc.returncode != 0 and "interventions" in out, out[-2000:]


def test_paper_config_is_migrated_and_passes_the_dry_run_once_its_paths_exist(tmp_path):
    paper = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    assert isinstance(paper["evaluation"]["interventions"], list)
    assert isinstance(paper["judges"]["available"], list)
    # Point the paper's paths at real (empty) folders, as a user does after editing them.
    paper["corpus"]["esd_root"] = str((tmp_path / "ESD").resolve())
    (tmp_path / "ESD").mkdir()
    paper["model"]["path"] = str(tmp_path / "Qwen2.5-Omni-7B")
    (tmp_path / "Qwen2.5-Omni-7B").mkdir()
    for judge in paper["judges"]["available"]:
        judge["model_dir"] = str(tmp_path / judge["name"])
        (tmp_path / judge["name"]).mkdir()
    ckpt = tmp_path / "utmos.pt"
    ckpt.write_bytes(b"")
    paper["judges"]["naturalness"]["checkpoint"] = str(ckpt)
    workdir = _workdir(tmp_path / "wf")
    proc, out = _snakemake(workdir, "-n", overrides=[paper])
    assert proc.returncode == 0, out[-3000:]
    variants = _variants_planned(out)
    assert any("_add_a0.5_" in v for v in variants) and any("_clamp_a0.5_" in v for v in variants)


@pytest.mark.parametrize("name, folder, misspelt", [
    ("kimi_audio", "Kimi-Audio-7B-Instruct", "audio_topk"),
    ("minicpm_o", "MiniCPM-o-4_5", "vocoder_batchsize"),
])
def test_adapter_configs_are_the_paper_setting_and_pass_the_dry_run(tmp_path, name, folder, misspelt):
    paper = yaml.safe_load((REPO / f"config/{name}.yaml").read_text())
    reference = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    # The paper's setting but for the model (a whole file: mappings merge across files).
    assert {k: v for k, v in paper.items() if k not in ("model", "results")} == \
        {k: v for k, v in reference.items() if k not in ("model", "results")}
    model = {"model": paper["model"]}
    paper["corpus"]["esd_root"] = str((tmp_path / "ESD").resolve())
    (tmp_path / "ESD").mkdir()
    for judge in paper["judges"]["available"]:
        judge["model_dir"] = str(tmp_path / judge["name"])
        (tmp_path / judge["name"]).mkdir()
    ckpt = tmp_path / "utmos.pt"
    ckpt.write_bytes(b"")
    paper["judges"]["naturalness"]["checkpoint"] = str(ckpt)
    model["model"]["path"] = str(tmp_path / folder)
    (tmp_path / folder).mkdir()
    workdir = _workdir(tmp_path / "wf")
    proc, out = _snakemake(workdir, "-n", overrides=[paper, model])
    assert proc.returncode == 0, out[-3000:]
    # Its options are the adapter's keyword arguments: a misspelt one is refused at DAG build.
    model["model"]["options"][misspelt] = 5
    proc, out = _snakemake(workdir, "-n", overrides=[paper, model])
    assert proc.returncode != 0 and f"model.options.{misspelt}" in out, out[-3000:]


# ----------------------------------------------------- 7. figures named by what they show


def test_headline_figure_is_named_by_the_anchor_selector(tmp_path):
    workdir = _workdir(tmp_path / "wf")
    proc, out = _snakemake(workdir, "-n", overrides=[{"evaluation": {"anchor": {"selector": "mad"}}}])
    assert proc.returncode == 0, out[-2000:]
    assert "results/figures/delta_heatmap_mad.png" in out and "delta_heatmap_cas.png" not in out


# ------------------------- 4, 5, 8: a real run under a results folder with a space in its name

SPACED = {
    "results": "res dir",
    "corpus": {"demo": {"speakers": 3, "utterances": 8}},
    "model": {"shard_sources": 8, "batch_size": 32},
    "capture": {"groups": ["lm"]},
    "success": {"caps": [50]},
    "selection": {"selectors": ["cas"], "groups": ["lm"], "rates": [0.0118]},
    "evaluation": {"max_sources": 1, "bootstrap": 10, "splits": ["test_unseen"], "interventions": []},
}


@pytest.fixture(scope="module")
def spaced(tmp_path_factory) -> Path:
    workdir = _workdir(tmp_path_factory.mktemp("spaced"))
    proc, out = _snakemake(workdir, overrides=[SPACED], timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return workdir


def test_a_results_folder_with_a_space_runs_and_leaves_nothing_outside_it(spaced):
    results = spaced / "res dir"
    assert (results / "report.md").read_text().strip()
    assert (results / "tables/table3_selectors.csv").stat().st_size > 0
    assert (results / "figures/delta_heatmap_cas.png").read_bytes()[:4] == b"\x89PNG"
    expected = {"Snakefile", "config.yaml", "override0.yaml", "workflow", "envs", "config", "res dir", ".snakemake"}
    assert {p.name for p in spaced.iterdir()} == expected


def test_manifest_paths_are_relative_so_a_copied_results_tree_reads_its_own_audio(spaced, tmp_path):
    manifest = spaced / "res dir/corpus/manifest.parquet"
    stored = pl.read_parquet(manifest)["path"]
    assert not any(os.path.isabs(p) for p in stored), stored[:3]
    copy = tmp_path / "elsewhere" / "copied results"
    shutil.copytree(spaced / "res dir", copy)
    read = read_manifest(copy / "corpus/manifest.parquet")
    assert all(Path(p).is_file() and Path(p).is_relative_to(copy.resolve()) for p in read["path"])
    # the `esn` commands that read the manifest work on the copy
    proc = _esn("calibrate-judge", "--manifest", str(copy / "corpus/manifest.parquet"), "--out",
                str(tmp_path / "judge.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_garbage_parquet_is_named_by_every_reader(spaced, tmp_path):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not a parquet file at all PAR1")
    proc = _esn("concat", "--inputs", str(garbage), "--out", str(tmp_path / "o.parquet"), cwd=tmp_path)
    assert proc.returncode != 0 and str(garbage) in proc.stderr and "not a readable Parquet" in proc.stderr
    evaluation = next((spaced / "res dir/eval").glob("*/evaluation.parquet"))
    proc = _esn("tables", "--evaluation", str(garbage), "--masks", "[]", "--anchor", "{}", "--out-dir",
                str(tmp_path / "t"), cwd=tmp_path)
    assert proc.returncode != 0 and str(garbage) in proc.stderr, proc.stderr[-2000:]
    assert evaluation.is_file()
    # a corrupt manifest: the dry run names it, not polars' bare "out of specification"
    work = tmp_path / "wf"
    shutil.copytree(spaced, work, symlinks=True)
    (work / "res dir/corpus/manifest.parquet").write_bytes(garbage.read_bytes())
    proc, out = _snakemake(work, "-n", overrides=[SPACED])
    assert proc.returncode != 0 and "res dir/corpus/manifest.parquet" in out and "not a readable Parquet" in out, \
        out[-3000:]


# ------------------------------------------------------ 6. variants do not depend on list order


def test_reordering_the_selectors_plans_the_same_variants(tmp_path):
    workdir = _workdir(tmp_path / "wf")
    proc, out = _snakemake(workdir, "-n")
    assert proc.returncode == 0, out[-2000:]
    shipped = _variants_planned(out)
    proc, out = _snakemake(workdir, "-n", overrides=[{"selection": {"selectors": ["random", "lap", "lape", "mad",
                                                                                 "cas"]}}])
    assert proc.returncode == 0, out[-2000:]
    # anchor on lm and synth, r, c, steer 2, deactivate, and CAS-H (the demo's simulated listeners)
    assert _variants_planned(out) == shipped and len(shipped) == 7
    assert any(v.startswith("human_") for v in shipped)
