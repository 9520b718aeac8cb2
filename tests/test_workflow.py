"""The Snakemake workflow on a tiny embedded default: runs, validates config, reruns only
what a config change touches, and reproduces identical tables."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from esn_core.corpus import SplitRule
from esn_core.workflow import Plan

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "corpus": {"demo": {"speakers": 3, "utterances": 10}},
    "model": {"shard_sources": 4, "batch_size": 32},
    "success": {"caps": [50]},
    "selection": {"selectors": ["cas", "random"], "groups": ["lm"], "rates": [0.0118]},
    "evaluation": {"max_sources": 2, "bootstrap": 50, "interventions": [{"method": "steer", "alphas": [1.0]}]},
    "human": {"kit": False, "simulate": None},  # the human part has its own tiny run: test_human_workflow.py
}


# Like a --configfile override: mappings merge key by key, lists are replaced whole (model
# options are replaced too, so that a test's options do not inherit another's).
REPLACED = {"options"}


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict) and key not in REPLACED
        out[key] = _merge(base[key], value) if nested else value
    return out


def _config(**override) -> dict:
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    return _merge(_merge(base, TINY), override)


def _workdir(path: Path, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "Snakefile", path)
    shutil.copytree(REPO / "workflow", path / "workflow", dirs_exist_ok=True)
    shutil.copytree(REPO / "envs", path / "envs", dirs_exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def _snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--nocolor", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)


def _planned_rules(workdir: Path, config: dict) -> dict[str, int]:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    proc = _snakemake(workdir, "-n", "--quiet", "rules")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    workdir = _workdir(tmp_path_factory.mktemp("wf"), _config())
    proc = _snakemake(workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def test_demo_workflow_produces_tables_figures_and_audit_trail(finished):
    results = finished / "results"
    for name in ("table2_baseline", "table3_selectors", "delta_grid"):
        for ext in ("parquet", "csv", "md"):
            assert (results / "tables" / f"{name}.{ext}").stat().st_size > 0
    assert (results / "figures" / "delta_heatmap_cas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (results / "report.md").read_text().strip()
    masks = pl.read_parquet(results / "masks/embedded/tau0.15/c50/lm/cas_r0.0118.parquet")
    assert set(masks["emotion"]) <= {"happy", "angry", "sad", "surprise"} and masks.height > 0
    attempts = pl.read_parquet(results / "sample/attempts/shard0.parquet")
    # audio paths are relative to the workflow directory, so a results folder can move with it
    assert all((finished / path).is_file() for path in attempts["audio_path"])
    table3 = pl.read_parquet(results / "tables/table3_selectors.parquet")
    assert set(table3["selector"]) == {"cas", "random"}


def test_nothing_to_do_after_a_complete_run(finished):
    assert _planned_rules(finished, _config()) == {}


@pytest.mark.parametrize(
    "change,must_run,must_not_run",
    [
        ({"selection": {"selectors": ["cas", "random", "mad"]}}, {"masks", "evaluate"}, {"sample", "success", "probs"}),
        ({"success": {"tau_wer": 0.3}}, {"success", "probs", "masks", "evaluate"}, {"sample", "corpus"}),
        ({"success": {"caps": [50, 10]}}, {"success", "probs", "masks", "evaluate"}, {"sample"}),
        ({"selection": {"rates": [0.0118, 0.005]}}, {"masks", "evaluate"}, {"sample", "success", "probs"}),
        ({"evaluation": {"interventions": [{"method": "steer", "alphas": [1.0]}, {"method": "deactivate"}]}},
         {"evaluate"},
         {"sample", "success", "probs", "masks"}),
        ({"judges": {"filter": "embedded_b", "available": [{"name": "embedded", "kind": "embedded"},
                                                           {"name": "embedded_b", "kind": "embedded"}]}},
         {"judge", "success", "probs", "masks", "evaluate"}, {"sample"}),
    ],
    ids=["selector", "tau_wer", "cap", "rate", "intervention", "judge"],
)
def test_config_changes_rerun_only_dependent_jobs(finished, change, must_run, must_not_run):
    planned = _planned_rules(finished, _config(**change))
    assert must_run <= set(planned), planned
    assert not (must_not_run & set(planned)), planned
    _planned_rules(finished, _config())  # restore


def test_wrong_config_key_or_value_is_named_before_any_job(tmp_path):
    bad = _config()
    bad["selection"]["selecters"] = ["cas"]
    workdir = _workdir(tmp_path / "a", bad)
    proc = _snakemake(workdir, "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "selecters" in out and "Additional properties" in out
    bad = _config(success={"tau_wer": -1})
    workdir = _workdir(tmp_path / "b", bad)
    proc = _snakemake(workdir, "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "tau_wer" in out and "minimum" in out
    assert not (workdir / "results").exists()


def test_bad_fused_counting_setting_is_named_before_any_job(tmp_path):
    workdir = _workdir(tmp_path / "a", _config())
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--nocolor", "-n"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "ESN_FUSED_COUNTING": "yes"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "environment ESN_FUSED_COUNTING: 'yes' is not one of auto, 0, 1" in out
    assert not (workdir / "results").exists()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "ESN_FUSED_COUNTING": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_killed_run_resumes_with_rerun_incomplete_and_identical_tables(finished):
    results = finished / "results"
    table = results / "tables/table3_selectors.csv"
    mask = results / "masks/embedded/tau0.15/c50/lm/cas_r0.0118.parquet"
    before_table, before_mask = table.read_bytes(), pl.read_parquet(mask)
    # Lose everything from the masks on, then kill the rerun while evaluation runs.
    for path in ["masks", "eval", "judgements/embedded/eval", "evaluation.parquet", "tables", "figures",
                 "report.md"]:
        target = results / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--nocolor"]
    proc = subprocess.Popen(cmd, cwd=finished, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list((results / "eval").glob("*/audio/*/*.wav")):
            assert proc.poll() is None, "the run ended before evaluation started"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not table.exists()
    # A hard kill leaves Snakemake's lock behind: unlock, then resume (README).
    assert _snakemake(finished, "--unlock").returncode == 0
    resumed = _snakemake(finished, "--rerun-incomplete")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert table.read_bytes() == before_table
    assert pl.read_parquet(mask).equals(before_mask)


def test_lint_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "good condition" in proc.stdout + proc.stderr, proc.stdout


def test_plan_variants_are_anchor_plus_one_at_a_time_sweeps():
    plan = Plan(_config(selection={"rates": [0.005, 0.01], "selectors": ["cas", "mad"], "groups": ["lm", "synth"]},
                        evaluation={"interventions": [{"method": "steer", "alphas": [1.0, 2.0]},
                                                      {"method": "deactivate"}],
                                    "anchor": {"selector": "cas", "rate": 0.005, "cap": 50, "group": "lm",
                                               "method": "steer", "alpha": 1.0}}))
    names = set(plan.variant_names)
    assert names == {
        "embedded_tau0.15_c50_lm_r0.005_steer_a1_cas+mad",
        "embedded_tau0.15_c50_synth_r0.005_steer_a1_cas+mad",
        "embedded_tau0.15_c50_lm_r0.01_steer_a1_cas",
        "embedded_tau0.15_c50_lm_r0.005_steer_a2_cas",
        "embedded_tau0.15_c50_lm_r0.005_deactivate_a0_cas",
    }
    with pytest.raises(ValueError, match="not defined under judges.available"):
        Plan(_config(judges={"report": ["e2v"]}))


def _run_on_human_labels(tmp_path: Path, adapter: str, checkpoint: Path, options: dict) -> None:
    """The whole workflow on a tiny random-weight ``adapter`` checkpoint, 3 demo speakers × 8
    utterances: it must finish, count a ``synth`` position for every attempt and tabulate
    both selectors.

    Random weights never sound emotional, so success comes from imported human labels (the
    CAS-H path of SPEC §3): every identification attempt "sounds" like its target.
    Labels name identification attempts only: a label for any other id is refused."""
    labels = tmp_path / "human_labels.csv"
    rule = SplitRule.for_demo(8)
    roles = rule.speaker_roles(["0011", "0012", "0013"])
    rows = [f"{spk}_{i:06d}.{t},{t}" for spk in ("0011", "0012", "0013") for i in range(1, 9)
            for t in ("happy", "angry", "sad", "surprise") if rule.split_of(roles[spk], i) == "identification"]
    labels.write_text("attempt_id,human_label\n" + "\n".join(rows) + "\n")
    config = _config(
        model={"adapter": adapter, "path": str(checkpoint), "batch_size": 16, "shard_sources": 16,
               "options": options},
        corpus={"demo": {"speakers": 3, "utterances": 8}},
        success={"tau_wer": 100.0, "human_labels": str(labels)},
        judges={"filter": "human"},  # human labels decide every variant's success sets
        evaluation={"max_sources": 1, "bootstrap": 20},
    )
    workdir = _workdir(tmp_path / "wf", config)
    proc = _snakemake(workdir, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = workdir / "results"
    attempts = pl.read_parquet(results / "sample/attempts/shard0.parquet")
    counts = pl.read_parquet(next((results / "sample/counts/synth").glob("shard*.parquet")))
    assert attempts.height == counts.height > 0 and (attempts["n_positions"] > 0).all()
    table3 = pl.read_parquet(results / "tables/table3_selectors.parquet")
    assert set(table3["selector"]) == {"cas", "random"}


def test_workflow_runs_end_to_end_on_a_tiny_qwen2_5_omni(tmp_path):
    """The paper's model class through the whole workflow (random weights: relaxed tau_wer),
    with token2wav overlapped with the next batch's decode (``overlap_speech``)."""
    from tiny_omni import build_tiny_omni

    checkpoint = build_tiny_omni(tmp_path / "Qwen2.5-Omni-tiny")
    _run_on_human_labels(tmp_path, "qwen2_5_omni", checkpoint,
                         {"dtype": "float32", "max_new_tokens": 6, "talker_max_new_tokens": 12,
                          "token2wav_steps": 2, "overlap_speech": True})


def test_workflow_runs_end_to_end_on_a_tiny_kimi_audio(tmp_path):
    """Kimi-Audio through the whole workflow (random weights: success from human labels)."""
    from tiny_kimi import build_checkpoint

    checkpoint = build_checkpoint(tmp_path / "Kimi-Audio-tiny")
    _run_on_human_labels(tmp_path, "kimi_audio", checkpoint,
                         {"dtype": "float32", "max_tokens": 120, "detokenizer_steps": 2})


def test_workflow_runs_end_to_end_on_a_tiny_minicpm_o(tmp_path):
    """MiniCPM-o 4.5 through the whole workflow (random weights, tiny token2wav assets)."""
    pytest.importorskip("onnx")
    from test_minicpm_vocoder import write_token2wav_assets
    from tiny_minicpm import build

    checkpoint = build(tmp_path / "MiniCPM-o-tiny", max_source_positions=1500)
    write_token2wav_assets(checkpoint)
    _run_on_human_labels(tmp_path, "minicpm_o_4_5", checkpoint,
                         {"dtype": "float32", "max_new_tokens": 4, "vocoder_steps": 2,
                          "sampling": {"min_codes": 2, "max_codes": 6}})


def test_outputs_are_readable_by_collaborators_under_the_umask(finished):
    umask = os.umask(0o022)
    os.umask(umask)
    results = finished / "results"
    for path in ["tables/table3_selectors.csv", "report.md", "figures/delta_heatmap_cas.png",
                 "masks/embedded/tau0.15/c50/lm/cas_r0.0118.parquet", "corpus/manifest.parquet"]:
        assert (results / path).stat().st_mode & 0o777 == 0o666 & ~umask, path
    wav = next((results / "sample/audio").glob("*.wav"))
    assert wav.stat().st_mode & 0o777 == 0o666 & ~umask


def test_report_bundles_the_tables_as_well_as_the_figures(finished):
    import zipfile

    proc = _snakemake(finished, "--report", "report.zip")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with zipfile.ZipFile(finished / "report.zip") as bundle:
        names = bundle.namelist()
    for table in ("table3_selectors.csv", "table2_baseline.csv"):
        assert any(n.endswith(table) for n in names), names
    assert any(n.endswith("delta_heatmap_cas.png") for n in names), names


# README's recipe for holes: files of the DAG that are missing while what follows from them is
# present (Snakemake then says "Nothing to be done").
HOLES = "snakemake --summary | awk -F'\\t' '$5 == \"missing\" {print $1}'"


def test_readme_recipe_finds_and_refills_a_deleted_intermediate(finished):
    readme = (REPO / "README.md").read_text()
    refill = HOLES + " | xargs -r -d '\\n' snakemake --cores all"
    assert HOLES in readme and refill in readme
    results = finished / "results"
    table = results / "tables/table3_selectors.csv"
    before = table.read_bytes()
    hole = next((results / "eval").glob("*_cas+random/evaluation.parquet"))
    hole.unlink()
    assert _planned_rules(finished, _config()) == {}  # the trap: nothing to be done
    listed = subprocess.run(["bash", "-c", HOLES], cwd=finished, capture_output=True, text=True, timeout=300)
    assert listed.stdout.split("\n")[:-1] == [str(hole.relative_to(finished))], listed.stdout + listed.stderr
    refilled = subprocess.run(["bash", "-c", refill], cwd=finished, capture_output=True, text=True, timeout=600)
    assert refilled.returncode == 0 and hole.is_file(), refilled.stderr[-3000:]
    assert _snakemake(finished).returncode == 0  # what follows from it reruns, to the same tables
    assert table.read_bytes() == before
    assert _planned_rules(finished, _config()) == {}


def test_rules_are_snakefmt_formatted():
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "."], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_config_readme_describes_every_key():
    from esn_core.config_checks import source_literal

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())

    def keys(node, prefix=""):
        for name, sub in node.get("properties", {}).items():
            path = f"{prefix}.{name}" if prefix else name
            yield path
            yield from keys(sub, path)
            if isinstance(sub.get("items"), dict):
                yield from keys(sub["items"], path + "[]")

    # the judge and estimator keys their loaders take (esn_core.judges.registry), too
    wanted = set(keys(schema))
    judge_keys = source_literal("esn_core.judges.registry", "_JUDGE_KEYS")
    wanted |= {f"judges.available[].{k}" for kind in judge_keys.values() for k in kind}
    wanted |= {f"judges.naturalness.{k}" for kind in source_literal("esn_core.judges.registry", "_MOS_KEYS").values()
               for k in kind}
    text = (REPO / "config/README.md").read_text()
    missing = sorted(k for k in wanted if f"| `{k}` |" not in text)
    assert not missing, missing
