"""`snakemake --cores all --profile slurm` against a real single-node SLURM on localhost.

The test starts slurmctld + slurmd + munge itself (scripts/slurm_local.sh, Debian slurm-wlm
22.05 installed by `scripts/install.sh --test`), runs a tiny demo workflow from a copied workdir
with the repository's profile, and checks that every non-local job went through sbatch and
finished, that the GPU rules asked SLURM for the fake `gpu` GRES, and that a failing job fails
the run instead of hanging. The daemons are stopped at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "scripts" / "slurm_local.sh"

pytestmark = [
    pytest.mark.skipif(shutil.which("sbatch") is None,
                       reason="SLURM not installed (no sbatch): `bash scripts/install.sh --test` installs it"),
    pytest.mark.skipif(os.geteuid() != 0, reason="starting slurmctld/slurmd/munged needs root"),
]

# The smallest demo that still runs every stage: one shard per split, one selector, one group.
TINY = {
    "corpus": {"demo": {"speakers": 3, "utterances": 8}},
    "model": {"gpus": 1, "shard_sources": 1000},
    "selection": {"selectors": ["cas"], "groups": ["lm"]},
    "evaluation": {"max_sources": 2, "bootstrap": 50},
}
RUN_TIMEOUT = 900  # seconds, as `timeout -s INT`: a status-check problem fails instead of hanging
# The profile's status-check delays suit a shared cluster; on an idle local node short ones cut
# the run time severalfold (MinJobAge=300 >= 3 x 2 s keeps `squeue` status checks valid).
FAST_STATUS = ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2"]
GPU_RULES = {"sample", "evaluate"}
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: \S*/rule_([A-Za-z0-9_]+)/")


class JobWatcher(threading.Thread):
    """Polls `scontrol show job` while snakemake runs: the controller's own record of every
    job (comment = rule, TresPerJob = GRES asked for). MinJobAge=300 keeps finished jobs
    listed for 5 minutes, so a poll every few seconds sees each one."""

    def __init__(self, env: dict, interval: float = 3.0):
        super().__init__(daemon=True)
        self.env, self.interval = env, interval
        self.jobs: dict[str, dict[str, str]] = {}
        self._halt = threading.Event()

    def poll(self) -> None:
        try:
            out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True,
                                 timeout=30, env=self.env).stdout
        except subprocess.TimeoutExpired:
            return
        for line in out.splitlines():
            record = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" in record:
                self.jobs[record["JobId"]] = record

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.poll()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    start = subprocess.run(["bash", str(SLURM_LOCAL), "start", str(state)], capture_output=True,
                           text=True, timeout=120, env=env)
    try:
        assert start.returncode == 0, f"slurm_local.sh start failed:\n{start.stdout}{start.stderr}"
        env["SLURM_CONF"] = str(state / "etc" / "slurm.conf")  # also linked from /etc/slurm
        yield state, env
    finally:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop", str(state)], capture_output=True,
                       text=True, timeout=120, env=env)


def _workdir(path: Path, *overrides: dict) -> Path:
    """The repository's workflow and profile, as a user's checkout has them."""
    path.mkdir(parents=True)
    shutil.copy(REPO / "Snakefile", path)
    shutil.copy(REPO / "config.yaml", path)
    for folder in ("workflow", "slurm", "envs"):
        if (REPO / folder).exists():
            shutil.copytree(REPO / folder, path / folder)
    for i, override in enumerate(overrides):
        (path / f"override{i}.yaml").write_text(yaml.safe_dump(override))
    return path


def _run_via_slurm(workdir: Path, env: dict, n_overrides: int):
    """`snakemake --cores all --profile slurm` from the workdir, under `timeout -s INT`."""
    configs = [f"override{i}.yaml" for i in range(n_overrides)]
    cmd = ["timeout", "-s", "INT", "-k", "60", str(RUN_TIMEOUT),
           sys.executable, "-m", "snakemake", "--cores", "all", "--profile", "slurm",
           "--configfile", *configs, "--nocolor", *FAST_STATUS]
    watcher = JobWatcher(env)
    watcher.start()
    t0 = time.monotonic()
    with open(workdir / "snakemake.out", "w") as out:
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=RUN_TIMEOUT + 120)
    seconds = time.monotonic() - t0
    watcher.stop()
    return proc.returncode, (workdir / "snakemake.out").read_text(), watcher.jobs, seconds


def _jobcomp(state: Path) -> dict[str, dict[str, str]]:
    """slurmctld's completion log (jobcomp/filetxt): one line per finished job."""
    path = state / "log" / "jobcomp.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines]
    return {r["JobId"]: r for r in records if "JobId" in r}


@pytest.fixture(scope="module")
def demo_run(slurm, tmp_path_factory):
    state, env = slurm
    workdir = _workdir(tmp_path_factory.mktemp("slurm_wf") / "wd", TINY)
    rc, log, jobs, seconds = _run_via_slurm(workdir, env, 1)
    return workdir, state, rc, log, jobs, seconds


def test_demo_workflow_runs_through_sbatch_and_finishes(demo_run):
    workdir, state, rc, log, jobs, seconds = demo_run
    assert rc == 0, f"exit {rc} after {seconds:.0f} s (124: timed out)\n{log[-6000:]}"
    results = workdir / "results"
    assert (results / "report.md").read_text().strip()
    assert (results / "tables" / "table3_selectors.md").stat().st_size > 0
    assert (results / "figures" / "delta_heatmap_cas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    submitted = dict(SUBMITTED.findall(log))  # SLURM job id -> rule
    rules = set(submitted.values())
    assert {"corpus", "sample", "judge", "success", "probs", "masks", "evaluate", "tables"} <= rules, rules
    # every job but the local `all` went to SLURM: one submission per non-local job header
    headers = re.findall(r"^(rule|checkpoint|localrule) (\w+):$", log, flags=re.M)
    assert {name for kind, name in headers if kind == "localrule"} <= {"all"}, headers
    assert len(submitted) == sum(kind != "localrule" for kind, _ in headers), (headers, submitted)

    # slurmctld's own records: each submitted job ran from this workdir and COMPLETED
    done = _jobcomp(state)
    for job_id, rule in submitted.items():
        assert job_id in done, f"SLURM job {job_id} ({rule}) never finished in slurmctld's view"
        assert done[job_id]["JobState"] == "COMPLETED", (rule, done[job_id])
        assert done[job_id]["WorkDir"] == str(workdir), (rule, done[job_id])
    assert len({done[job_id]["Name"] for job_id in submitted}) == 1  # one run: the plugin's run uuid


def test_gpu_rules_request_the_gpu_gres(demo_run):
    workdir, state, rc, log, jobs, seconds = demo_run
    assert rc == 0, "workflow run failed (see the test above)"
    submitted = dict(SUBMITTED.findall(log))
    assert set(submitted) <= set(jobs), "some SLURM jobs were never seen by scontrol"
    for job_id, rule in submitted.items():
        record = jobs[job_id]
        assert record["Comment"].split("_wildcards_")[0] == f"rule_{rule}", record
        wants_gpu = "gpu" in record.get("TresPerJob", "")
        if rule in GPU_RULES:
            assert record.get("TresPerJob") == "gres:gpu:1", (rule, record)  # from resources: gpu=1
        else:
            assert not wants_gpu, (rule, record)


def test_a_failing_job_fails_the_run(slurm, tmp_path):
    state, env = slurm
    # An existing folder with no ESD tree in it passes the dry-run checks and fails in the job.
    (tmp_path / "empty_esd").mkdir()
    broken = {"corpus": {"source": "esd", "esd_root": str(tmp_path / "empty_esd")}}
    workdir = _workdir(tmp_path / "wd", TINY, broken)
    rc, log, jobs, seconds = _run_via_slurm(workdir, env, 2)
    assert rc not in (0, 124, 137), f"exit {rc} after {seconds:.0f} s\n{log[-4000:]}"
    assert re.search(r"Error in rule corpus:\s+message: SLURM-job '\d+' failed", log), log[-4000:]
    failed = [r for r in _jobcomp(state).values() if r.get("WorkDir") == str(workdir)]
    assert any(r["JobState"] == "FAILED" for r in failed), failed


# Two models with different resources (issue 19): a GPU model and a CPU one with more memory
# and a longer wall time. Each model's sample / evaluate jobs must ask SLURM for its own.
TWO_MODELS = {
    "model": None,
    "models": {
        "gpu_lalm": {"adapter": "planted", "path": None, "batch_size": 16, "shard_sources": 1000, "threads": 1,
                     "gpus": 1, "mem_mb": 1500, "runtime_min": 20},
        "cpu_lalm": {"adapter": "planted", "path": None, "plant_layers": 6, "batch_size": 16,
                     "shard_sources": 1000, "threads": 1, "gpus": 0, "mem_mb": 2500, "runtime_min": 40},
    },
    "selection": {"rates": [0.0118]},
    "evaluation": {"interventions": []},
    "human": {"kit": False, "simulate": None},
}
MODEL_RESOURCES = {"gpu_lalm": ("gres:gpu:1", "1500M", "00:20:00"), "cpu_lalm": (None, "2500M", "00:40:00")}


def test_each_models_gpu_rules_ask_slurm_for_that_models_resources(slurm, tmp_path):
    state, env = slurm
    workdir = _workdir(tmp_path / "wd", TINY, TWO_MODELS)
    rc, log, jobs, seconds = _run_via_slurm(workdir, env, 2)
    assert rc == 0, f"exit {rc} after {seconds:.0f} s (124: timed out)\n{log[-6000:]}"
    assert (workdir / "results" / "tables" / "table3_selectors_models.md").stat().st_size > 0
    submitted = dict(SUBMITTED.findall(log))
    assert set(submitted) <= set(jobs), "some SLURM jobs were never seen by scontrol"
    seen = set()
    for job_id, rule in submitted.items():
        if rule not in GPU_RULES:
            continue
        record = jobs[job_id]
        # the plugin's comment: rule_<rule>_wildcards_<values joined by _>, {model} first
        values = record["Comment"].split("_wildcards_", 1)[1]
        model = next(m for m in MODEL_RESOURCES if values.startswith(f"{m}_"))
        gres, memory, limit = MODEL_RESOURCES[model]
        if gres:
            assert record.get("TresPerJob") == gres, (model, record)
        else:
            assert "gpu" not in record.get("TresPerJob", ""), (model, record)
        assert record["MinMemoryNode"] == memory and record["TimeLimit"] == limit, (model, record)
        seen.add((rule, model))
    assert seen == {(r, m) for r in GPU_RULES for m in MODEL_RESOURCES}, seen
