"""Human evaluation through Snakemake, as a lab meets it: the demo's kit and simulated
listeners give Fig. 8 and CAS-H; a lab's listener files are workflow inputs (a missing one
fails the dry run naming the config key, an edited one reruns the import, a bad row is named
by file and row); and the kit works in a real browser (headless Chromium) end to end."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from esn_core.loudness import integrated_loudness
from kit_browser import Browser, chromium, click_answer, wait_for_file
from test_workflow import _config, _snakemake, _workdir

# the smallest config with both human parts: one selector, one variant besides CAS-H's
HUMAN_TINY = dict(
    selection={"selectors": ["cas"], "groups": ["lm"], "rates": [0.0118]},
    human={"kit": True, "pairs_per_emotion": 25, "label_per_emotion": 3, "ab_results": None,
           "simulate": {"listeners": 20, "noise": 0.2}},
)


def _prov(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"esn.provenance"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    workdir = _workdir(tmp_path_factory.mktemp("human"), _config(**HUMAN_TINY))
    proc = _snakemake(workdir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return workdir


def _copy(finished: Path, dest: Path, **override) -> Path:
    """A copy of the finished workflow (mtimes kept, so nothing reruns) with a changed config."""
    shutil.copytree(finished, dest, symlinks=True)
    config = yaml.safe_load((finished / "config.yaml").read_text())
    for key, value in override.items():
        config[key] = {**config.get(key, {}), **value}
    (dest / "config.yaml").write_text(yaml.safe_dump(config))
    return dest


def test_demo_builds_the_kit_and_reports_fig8_and_cas_h(finished):
    results = finished / "results"
    kit = results / "human/kit"
    assert {p.name for p in kit.iterdir() if not p.name.startswith(".")} == {"index.html", "kit.js", "kit.css", "trials.js", "clips"}
    trials = json.loads((kit / "trials.js").read_text().removeprefix("window.ESN_KIT = ").rstrip().rstrip(";"))
    key = pl.read_parquet(results / "human/ab_key.parquet")
    labels_key = pl.read_parquet(results / "human/label_key.parquet")
    # 2 test splits x max_sources 2 = 4 sources per target: fewer than 25, so all of them
    assert len(trials["ab"]) == 16 and len(trials["label"]) == 12 == labels_key.height
    assert len(list((kit / "clips").glob("*.wav"))) == 2 * 16 + 12
    # blind: no attempt id, condition or role in anything the listener's browser loads
    loaded = "".join((kit / n).read_text() for n in ("trials.js", "index.html", "kit.js"))
    assert not any(a in loaded for a in key["attempt_id"].to_list() + labels_key["attempt_id"].to_list())
    assert "intervened" not in loaded and "baseline" not in loaded
    for clip in key["clip"].to_list()[:4]:
        samples, rate = sf.read(kit / "clips" / f"{clip}.wav")
        assert integrated_loudness(samples, rate) == pytest.approx(-23.0, abs=0.3)  # 16-bit rounding
    fig8 = pl.read_parquet(results / "tables/fig8_ab.parquet")
    assert fig8["emotion"].to_list() == ["happy", "angry", "sad", "surprise", "avg"]
    assert fig8["n_listeners"].to_list() == [20] * 5 and fig8["n_pairs"].to_list() == [4, 4, 4, 4, 16]
    total = fig8["win_pct"] + fig8["tie_pct"] + fig8["loss_pct"]
    assert total.to_list() == pytest.approx([100.0] * 5)
    assert (results / "figures/human/ab_preference.png").stat().st_size > 0
    # human labels are the judge "human": own paths and provenance, beside the SER judge's
    human = results / "success/human/tau0.15/c50.parquet"
    embedded = results / "success/embedded/tau0.15/c50.parquet"
    assert _prov(human)["judge"] == "human" and _prov(embedded)["judge"] == "embedded"
    h, e = pl.read_parquet(human), pl.read_parquet(embedded)
    assert h["attempt_id"].to_list() == e["attempt_id"].to_list()
    assert h["label"].null_count() == h.height - 12  # only the 12 labelled attempts have a label
    assert (results / "probs/human/tau0.15/c50/lm.parquet").exists()
    assert (results / "masks/human/tau0.15/c50/lm/cas_r0.0118.parquet").exists()
    table3 = pl.read_parquet(results / "tables/table3_selectors.parquet")
    assert table3["selector"].to_list() == ["cas", "cas_h"]
    table5 = pl.read_parquet(results / "tables/table5_masks.parquet")
    assert table5.filter(pl.col("selector_b") == "cas_h")["emotion"].to_list()[-1] == "average"
    report = (results / "report.md").read_text()
    assert "## Human A/B preference (Fig. 8)" in report and "![ab_preference](figures/human/ab_preference.png)" in report
    assert "## Human-labelled success sets (CAS-H, Table 3)" in report and "| cas_h |" in report


@pytest.mark.parametrize("key, section", [("human_labels", "success"), ("ab_results", "human")])
def test_a_missing_listener_file_fails_the_dry_run_naming_the_key(tmp_path, key, section):
    config = _config(**HUMAN_TINY)
    config[section] = {**config[section], key: str(tmp_path / "answers" / "nobody.csv")}
    proc = _snakemake(_workdir(tmp_path / "wf", config), "-n")
    assert proc.returncode != 0
    assert f"config {section}.{key}: '{tmp_path / 'answers' / 'nobody.csv'}' does not exist" in proc.stdout + proc.stderr


def test_lab_label_files_are_inputs_and_bad_rows_are_named(finished, tmp_path):
    lab = tmp_path / "lab"
    lab.mkdir()
    for f in sorted((finished / "results/human/simulated").glob("*.csv"))[:3]:
        shutil.copy(f, lab / f.name)
    workdir = _copy(finished, tmp_path / "wf", success={"human_labels": str(lab)})
    target = "results/human/labels.parquet"
    proc = _snakemake(workdir, target)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "3 listener(s)" in (workdir / "results/logs/human/import_labels.log").read_text()
    nothing = _snakemake(workdir, "-n", target)
    assert "Nothing to be done" in nothing.stdout + nothing.stderr
    # a listener corrects one answer: the import reruns (and, through it, CAS-H)
    time.sleep(1.1)
    edited = lab / "sim01.csv"
    lines = edited.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if ",label," in line)
    cells = lines[n].split(",")

    def answer(value: str) -> None:
        lines[n] = ",".join(cells[:-1] + [value])
        edited.write_text("\n".join(lines) + "\n")

    answer("sad" if cells[-1] != "sad" else "happy")
    plan = _snakemake(workdir, "-n", "--quiet", "rules")
    assert re.search(r"^import_human_labels\s+1$", plan.stdout + plan.stderr, re.M), plan.stdout + plan.stderr
    # a misspelt label is refused, naming the file and the row
    answer("angyr")
    bad = _snakemake(workdir, target)
    assert bad.returncode != 0
    log = (workdir / "results/logs/human/import_labels.log").read_text()
    assert f"{edited} row {n + 1}: label 'angyr' is not one of" in log
    # nothing partial: no table (Snakemake drops a failed job's output) and no temp file
    assert not (workdir / target).exists() and not list((workdir / "results/human").glob(".labels*"))


AUDIO_LOADED = "Array.from(document.querySelectorAll('audio')).every(a => a.duration > 0)"


def test_the_kit_in_a_real_browser_feeds_the_import_rules(finished, tmp_path):
    assert chromium(), "needs Debian's chromium: bash scripts/install.sh --test"
    downloads = tmp_path / "downloads"
    workdir = _copy(finished, tmp_path / "wf", success={"human_labels": str(downloads)},
                    human={"ab_results": str(downloads)})
    kit = workdir / "results/human/kit/index.html"
    browser = Browser(downloads)
    try:
        browser.open(kit.resolve().as_uri())
        browser.js("document.getElementById('listener').value = 'ann'; document.getElementById('start').click()")
        total = len(browser.js("window.ESN_KIT.ab")) + len(browser.js("window.ESN_KIT.label"))
        choices = ["A", "B", "indecisive"]
        for trial in range(total):
            progress = browser.js("document.getElementById('progress').textContent")
            assert f"trial {trial + 1} of {total}" in progress
            if trial in (0, total - 1):  # the clips load from disk (file://)
                browser.wait(AUDIO_LOADED)
            if progress.startswith("Part 1"):
                click_answer(browser, choices[trial % 3])
            else:
                click_answer(browser, "sad" if trial % 2 else "unclear")
        assert browser.js("document.getElementById('done').hidden") is False
        browser.js("document.getElementById('export').click()")
        exported = wait_for_file(downloads, "ann_*.csv")
        # the same kit served by `python -m http.server` (no server of ours)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                  cwd=kit.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    browser.open(f"http://127.0.0.1:{port}/index.html")
                    break
                except (RuntimeError, TimeoutError):
                    time.sleep(0.1)
            browser.js("document.getElementById('listener').value = 'bob'; document.getElementById('start').click()")
            assert f"trial 1 of {total}" in browser.js("document.getElementById('progress').textContent")
            browser.wait(AUDIO_LOADED)
        finally:
            server.terminate()
            server.wait(timeout=10)
    finally:
        browser.close()
    answers = pl.read_csv(exported)
    assert answers.height == total and answers["trial"].to_list() == list(range(1, total + 1))
    proc = _snakemake(workdir, "results/tables/fig8_ab.parquet", "results/human/labels.parquet")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    fig8 = pl.read_parquet(workdir / "results/tables/fig8_ab.parquet")
    assert fig8["n_listeners"].to_list() == [1] * 5
    # expected outcomes from the key: A/B picks a side, the key says which side is intervened
    key = pl.read_parquet(workdir / "results/human/ab_key.parquet")
    role = dict(zip(key["clip"], key["role"]))
    ab = answers.filter(pl.col("task") == "ab")
    wins = sum(role[r["clip_a"] if r["answer"] == "A" else r["clip_b"]] == "intervened"
               for r in ab.iter_rows(named=True) if r["answer"] != "indecisive")
    avg = fig8.filter(pl.col("emotion") == "avg").row(0, named=True)
    assert avg["n_answers"] == ab.height == 16
    imported = pl.read_parquet(workdir / "results/human/ab_answers.parquet")
    assert (imported["outcome"] == "win").sum() == wins
    assert (imported["outcome"] == "tie").sum() == (ab["answer"] == "indecisive").sum()
    labels = pl.read_parquet(workdir / "results/human/labels.parquet")
    sad = answers.filter((pl.col("task") == "label") & (pl.col("answer") == "sad")).height
    assert labels.height == 12 and labels["n_answers"].to_list() == [1] * 12
    assert (labels["label"] == "sad").sum() == sad and labels["label"].null_count() == 12 - sad
