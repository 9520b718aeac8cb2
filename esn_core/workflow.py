"""What the Snakemake workflow runs, derived from the (validated) config alone.

The one place that knows how config values become file paths and variants, so the rules
stay declarative and this logic is testable without Snakemake. Paths spell out the
parameters that produced them (judge, tau_wer, c, group, selector, r, method, alpha), which
is what makes variants coexist and reruns incremental.

Evaluation *variants*: the anchor cell (SPEC §9) compares every selector, on every
configured group; each other value of r, c and (method, alpha) in the config is a
one-at-a-time sweep around the anchor with the anchor selector only (Figs. 4-7).
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, dataclass
from typing import Any, Callable

import polars as pl

from esn_core.human import HUMAN
from esn_core.io import read_frame
from esn_core.select import SELECTORS


def _num(x: float) -> str:
    """Compact, stable number text for paths: 0.005 -> '0.005', 1.0 -> '1'."""
    return f"{float(x):g}"


@dataclass(frozen=True)
class Variant:
    judge: str
    tau: float
    cap: int
    group: str
    rate: float
    method: str
    alpha: float
    selectors: tuple[str, ...]
    results: str
    condition_suffix: str = ""  # "_h" for the CAS-H variant: its condition is "cas_h" in the tables

    @property
    def name(self) -> str:
        return (
            f"{self.judge}_tau{_num(self.tau)}_c{self.cap}_{self.group}_r{_num(self.rate)}_"
            f"{self.method}_a{_num(self.alpha)}_{'+'.join(self.selectors)}"
        )

    def mask_path(self, selector: str) -> str:
        return (
            f"{self.results}/masks/{self.judge}/tau{_num(self.tau)}/c{self.cap}/{self.group}/"
            f"{selector}_r{_num(self.rate)}.parquet"
        )

    def mask_paths(self) -> list[str]:
        return [self.mask_path(s) for s in self.selectors]

    def condition(self, selector: str) -> str:
        """The selector's name in the tables: ``cas``, or ``cas_h`` on human-label masks."""
        return f"{selector}{self.condition_suffix}"

    def mask_args(self) -> list[str]:
        """``condition=path`` items of the evaluate command (the rule quotes each)."""
        return [f"{self.condition(s)}={self.mask_path(s)}" for s in self.selectors]

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("results")
        d["selectors"] = list(self.selectors)
        return json.dumps(d, sort_keys=True)


LALM_DIR = "lalm"  # results/lalm/<name>/: one model's tree in the `models:` form
# What a judge's jobs ask the cluster for, per judge entry (a 30B LALM judge and the
# embedded one differ), and the defaults.
JUDGE_RESOURCES = ("gpus", "mem_mb", "runtime_min")
JUDGE_MEM_MB = 8000
JUDGE_RUNTIME_MIN = 120


def model_entries(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> model entry, in config order. The single ``model:`` form is one entry named
    after its adapter; its paths stay where they always were (directly under results/)."""
    if is_multi(config):
        if config.get("model") is not None:
            raise ValueError("config: give either model: (one LALM) or models: (several), not both; an override "
                             "that adds models: to the shipped config sets model: null")
        return {str(name): dict(entry) for name, entry in config["models"].items()}
    if config.get("model") is None:
        raise ValueError("config: model: (one LALM) or models: (several) is required")
    return {str(config["model"]["adapter"]): dict(config["model"])}


def is_multi(config: dict[str, Any]) -> bool:
    """The ``models:`` form (even with one entry): each model's tree under results/lalm/<name>/."""
    return config.get("models") is not None


class Plan:
    """Config -> paths, variants and command-line arguments for the rules of one model."""

    def __init__(self, config: dict[str, Any], model: str | None = None):
        self.config = config
        entries = model_entries(config)
        if model is None:
            if len(entries) != 1:
                raise ValueError(f"config models: {sorted(entries)}: name the model to plan")
            model = next(iter(entries))
        if model not in entries:
            raise KeyError(f"config models: no model {model!r}; have {list(entries)}")
        self.model_name = model
        self.model = entries[model]
        self.multi = is_multi(config)
        # shared by every model: the corpus and the judges calibrated on it
        self.shared = str(config["results"]).rstrip("/")
        self.results = f"{self.shared}/{LALM_DIR}/{model}" if self.multi else self.shared
        model = self.model
        self.gpus = int(model.get("gpus", 1))
        self.model_mem_mb = int(model.get("mem_mb", 16000))
        self.model_runtime_min = int(model.get("runtime_min", 240))
        self.threads = int(model.get("threads", 1))
        self.plant_layers = model.get("plant_layers")
        self.capture_groups = list(dict.fromkeys(config["capture"]["groups"]))
        judges = config["judges"]
        # judges.available is a list (an override replaces it whole); looked up by name here
        self.judges = {entry["name"]: dict(entry) for entry in judges["available"]}
        self.filter_judge = judges["filter"]
        self._plan_human(config)
        # human labels decide success sets only: evaluation audio is judged by machines
        self.report_judges = [j for j in dict.fromkeys([judges["filter"], *judges["report"]]) if j != HUMAN]
        if not self.report_judges:
            raise ValueError("config judges.report: name a machine judge to judge the evaluation audio "
                             "(judges.filter is 'human')")
        for name in self.report_judges:
            if name not in self.judges:
                raise ValueError(f"config judges: {name!r} is used but not defined under judges.available")
        for group in config["selection"]["groups"]:
            if group not in self.capture_groups:
                raise ValueError(
                    f"config selection.groups: {group!r} is selected on but capture.groups "
                    f"{self.capture_groups} does not store its counts"
                )
        self.variants = {v.name: v for v in self._variants()}
        self.variant_names = list(self.variants)

    # -- variants ------------------------------------------------------------------
    def _variants(self) -> list[Variant]:
        cfg = self.config
        anchor = cfg["evaluation"]["anchor"]
        tau = float(cfg["success"]["tau_wer"])
        chosen = cfg["selection"]["selectors"]
        unknown = [s for s in chosen if s not in SELECTORS]
        if unknown:
            raise ValueError(f"config selection.selectors: unknown selector(s) {unknown}; known: {SELECTORS}")
        # Sorted, so that reordering the config list names (and reruns) nothing new.
        selectors = tuple(sorted(set(chosen)))
        if anchor["selector"] not in selectors:
            raise ValueError(
                f"config evaluation.anchor.selector {anchor['selector']!r} is not in selection.selectors"
            )

        def make(**changes) -> Variant:
            base = dict(
                judge=self.filter_judge, tau=tau, cap=int(anchor["cap"]), group=anchor["group"],
                rate=float(anchor["rate"]), method=anchor["method"], alpha=float(anchor["alpha"]),
                selectors=(anchor["selector"],), results=self.results,
            )
            base.update(changes)
            return Variant(**base)

        out = [make(group=g, selectors=selectors) for g in cfg["selection"]["groups"]]
        if self.human_labels_source and self.filter_judge != HUMAN:
            # CAS-H (Table 3): the anchor selector on human-label success sets, beside the SER's
            out.append(make(judge=HUMAN, condition_suffix="_h"))
        out += [make(rate=float(r)) for r in cfg["selection"]["rates"] if float(r) != float(anchor["rate"])]
        out += [make(cap=int(c)) for c in cfg["success"]["caps"] if int(c) != int(anchor["cap"])]
        for entry in cfg["evaluation"]["interventions"]:
            method = entry["method"]
            # deactivate has no alpha; any other method with no alphas is refused by config_checks
            for alpha in [0.0] if method == "deactivate" else entry.get("alphas") or []:
                if (method, float(alpha)) != (anchor["method"], float(anchor["alpha"])):
                    out.append(make(method=method, alpha=float(alpha)))
        return list({v.name: v for v in out}.values())

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            raise KeyError(f"unknown evaluation variant {name!r}")
        return self.variants[name]

    def all_mask_paths(self) -> list[str]:
        return sorted({p for v in self.variants.values() for p in v.mask_paths()})

    def mask_records_json(self) -> str:
        records = {}
        for v in self.variants.values():
            for s in v.selectors:
                records[v.mask_path(s)] = dict(selector=v.condition(s), group=v.group, rate=v.rate, cap=v.cap, path=v.mask_path(s))
        return json.dumps(sorted(records.values(), key=lambda r: r["path"]))

    @property
    def anchor_selector(self) -> str:
        """The selector of the anchor cell: the headline figure is named after it."""
        return self.config["evaluation"]["anchor"]["selector"]

    def anchor_json(self) -> str:
        a = dict(self.config["evaluation"]["anchor"])
        a["rate"], a["alpha"], a["cap"] = float(a["rate"]), float(a["alpha"]), int(a["cap"])
        return json.dumps(a, sort_keys=True)

    # -- shards --------------------------------------------------------------------
    def n_shards(self, manifest_path: str, split: str) -> int:
        n = self.n_sources(manifest_path, split)
        return max(1, math.ceil(n / int(self.model["shard_sources"])))

    def n_sources(self, manifest_path: str, split: str) -> int:
        frame = read_frame(manifest_path, "manifest", columns=["split", "emotion"])
        n = frame.filter((pl.col("split") == split) & (pl.col("emotion") == "neutral")).height
        cap = self.config["evaluation"].get("max_sources")
        if split != "identification" and cap is not None:
            n = min(n, int(cap))
        return n

    def sample_shards(self, kind: str, n: int) -> list[str]:
        return [f"{self.results}/sample/{kind}/shard{k}.parquet" for k in range(n)]

    def sample_judgements(self, judge: str, n: int) -> list[str]:
        if judge == HUMAN:
            return [self.human_labels_table]
        return [f"{self.results}/judgements/{judge}/sample/shard{k}.parquet" for k in range(n)]

    def eval_shards(self, variant: str, n_shards: Callable[[str], int]) -> list[str]:
        return [
            f"{self.results}/eval/{variant}/attempts/{split}/shard{k}.parquet"
            for split in self.config["evaluation"]["splits"]
            for k in range(n_shards(split))
        ]

    def eval_judgements(self, variant: str, n_shards: Callable[[str], int]) -> list[str]:
        return [
            f"{self.results}/judgements/{judge}/eval/{variant}/{split}/shard{k}.parquet"
            for judge in self.report_judges
            for split in self.config["evaluation"]["splits"]
            for k in range(n_shards(split))
        ]

    # -- arguments -----------------------------------------------------------------
    def corpus_args(self) -> str:
        corpus = self.config["corpus"]
        speakers = corpus.get("speakers")
        spk = f" --speakers {' '.join(speakers)}" if speakers else ""
        if corpus["source"] == "demo":
            demo = corpus["demo"]
            return (
                f"--source demo --demo-tree {shlex.quote(self.shared + '/corpus/demo_esd')}"
                f" --demo-speakers {demo['speakers']} --demo-utterances {demo['utterances']}"
                f" --seed {self.config['seed']}{spk}"
            )
        return (
            f"--source esd --esd-root {shlex.quote(str(corpus['esd_root']))}"
            f" --cache-dir {shlex.quote(self.shared + '/corpus/resampled')}{spk}"
        )

    def model_path(self) -> str:
        model = self.model
        if model.get("path"):
            return str(model["path"])
        if model["adapter"] != "planted":
            raise ValueError(f"config {self.model_key}.path is required for adapter {model['adapter']!r}")
        return f"{self.results}/models/planted"

    @property
    def model_key(self) -> str:
        """The model's key path in the config, for messages."""
        return f"models.{self.model_name}" if self.multi else "model"

    def model_inputs(self) -> list[str]:
        model = self.model
        if model["adapter"] == "planted" and not model.get("path"):
            return [f"{self.results}/models/planted/config.json"]
        return []

    def model_json(self) -> str:
        model = self.model
        return json.dumps({"adapter": model["adapter"], "path": self.model_path(), "options": model.get("options") or {}})

    def judge_spec(self, name: str) -> dict[str, Any]:
        """How to load judge ``name`` (what its job runs on is not part of it: changing a
        judge's resources reruns nothing)."""
        spec = {k: v for k, v in self.judges[name].items() if k not in JUDGE_RESOURCES}
        if spec["kind"] == "embedded" and not spec.get("path"):
            spec["path"] = f"{self.shared}/judges/embedded.json"
        return spec

    def judge_inputs(self, name: str) -> list[str]:
        spec = self.judges.get(name)
        if spec is None:
            raise KeyError(f"judge {name!r} is not defined under judges.available")
        if spec["kind"] == "embedded" and not spec.get("path"):
            return [f"{self.shared}/judges/embedded.json"]
        return []

    def judge_json(self, name: str) -> str:
        return json.dumps(self.judge_spec(name), sort_keys=True)

    def judge_gpus(self, name: str) -> int:
        """The judge's own ``gpus``; else none for the embedded judge, the model's otherwise."""
        entry = self.judges[name]
        if "gpus" in entry:
            return int(entry["gpus"])
        return 0 if entry["kind"] == "embedded" else self.gpus

    def judge_mem_mb(self, name: str) -> int:
        return int(self.judges[name].get("mem_mb", JUDGE_MEM_MB))

    def judge_runtime_min(self, name: str) -> int:
        return int(self.judges[name].get("runtime_min", JUDGE_RUNTIME_MIN))

    def naturalness_json(self) -> str:
        return json.dumps(self.config["judges"].get("naturalness"))

    def human_labels_arg(self, judge: str) -> str:
        return f"--human-labels {shlex.quote(self.human_labels_table)}" if judge == HUMAN else ""

    def ab_report_args(self) -> str:
        """The report's Fig. 8 arguments, when A/B answers exist."""
        if not self.ab_source:
            return ""
        return f"--ab-table {shlex.quote(self.ab_table)} --ab-figure {shlex.quote(self.ab_figure)}"

    # -- human evaluation (SPEC §7, paper §5.4) --------------------------------------
    def _plan_human(self, config: dict[str, Any]) -> None:
        """Where listener files come from: the lab's (config keys success.human_labels and
        human.ab_results: a listener file or a folder of them), else, when human.simulate is
        set, simulated listeners (the embedded default), else none (no CAS-H, no Fig. 8)."""
        import os

        human = config.get("human") or {}
        self.human = human
        self.simulate = human.get("simulate")
        self.human_dir = f"{self.results}/human"
        self.label_key = f"{self.human_dir}/label_key.parquet"
        self.ab_key = f"{self.human_dir}/ab_key.parquet"
        self.kit_dir = f"{self.human_dir}/kit"
        self.simulated_dir = f"{self.human_dir}/simulated"
        self.human_labels_table = f"{self.human_dir}/labels.parquet"
        self.ab_table = f"{self.results}/tables/fig8_ab.parquet"
        self.ab_figure = f"{self.results}/figures/human/ab_preference.png"
        if HUMAN in self.judges:
            raise ValueError(f"config judges.available: {HUMAN!r} is reserved for imported human labels "
                             "(success.human_labels)")
        sources = {}
        for key, given in (("success.human_labels", config["success"].get("human_labels")),
                           ("human.ab_results", human.get("ab_results"))):
            if given:
                if self.multi:
                    # a listener file labels one model's attempts: whose, the config cannot say yet
                    raise ValueError(f"config {key}: listener files are not supported with models: (several "
                                     "LALMs); run each model on its own with model:, or use human.simulate")
                if not os.path.exists(given):
                    raise ValueError(f"config {key}: {given!r} does not exist (a listener file or a folder of them)")
                if not self._listener_files(given):
                    raise ValueError(f"config {key}: the folder {given!r} holds no listener file (*.csv)")
                sources[key] = given
            elif self.simulate:
                sources[key] = self.simulated_dir
        self.human_labels_source = sources.get("success.human_labels")
        self.ab_source = sources.get("human.ab_results")
        if self.filter_judge == HUMAN and not self.human_labels_source:
            raise ValueError("config judges.filter: 'human' needs success.human_labels (listener files)")
        if self.filter_judge == HUMAN and self.human_labels_source == self.simulated_dir:
            raise ValueError("config judges.filter: 'human' with simulated listeners is circular (they follow the "
                             "evaluation of the human masks); set success.human_labels or another filter")

    @staticmethod
    def _listener_files(source: str) -> list[str]:
        from esn_core.human import listener_files

        return [str(p) for p in listener_files(source)]

    def human_label_inputs(self) -> list[str]:
        """Inputs of the label import: the listener files themselves, so editing one reruns it."""
        if self.human_labels_source == self.simulated_dir:
            return [self.simulated_dir]
        return self._listener_files(self.human_labels_source)

    def ab_inputs(self) -> list[str]:
        if self.ab_source == self.simulated_dir:
            return [self.simulated_dir]
        return self._listener_files(self.ab_source)

    @property
    def kit_variant(self) -> Variant:
        """The evaluated variant the A/B pairs come from: the anchor cell (SPEC §7)."""
        anchor = self.config["evaluation"]["anchor"]
        for v in self.variants.values():
            if (v.judge == self.filter_judge and v.group == anchor["group"] and anchor["selector"] in v.selectors
                    and not v.condition_suffix):
                return v
        raise ValueError("no evaluation variant holds the anchor cell")

    def simulation_judgements(self, n_shards: Callable[[str], int]) -> list[str]:
        """What simulated listeners "hear": the first reporting (machine) judge's labels of
        the identification attempts and of the kit variant's evaluation attempts."""
        judge = self.report_judges[0]
        sample = self.sample_judgements(judge, n_shards("identification"))
        return sample + [
            f"{self.results}/judgements/{judge}/eval/{self.kit_variant.name}/{split}/shard{k}.parquet"
            for split in self.config["evaluation"]["splits"] for k in range(n_shards(split))
        ]

    def human_targets(self) -> list[str]:
        """What `rule all` asks of the human part: the kit (when configured), Fig. 8 (when
        answers exist); CAS-H comes in through Table 3's variants."""
        out = []
        if self.human.get("kit", False):
            out.append(self.kit_dir)
        if self.ab_source:
            out.append(self.ab_figure)
        return out

    def max_sources_arg(self) -> str:
        cap = self.config["evaluation"].get("max_sources")
        return f"--max-sources {int(cap)}" if cap is not None else ""

    # -- targets -------------------------------------------------------------------
    def success_paths(self) -> list[str]:
        tau = _num(self.config["success"]["tau_wer"])
        return [f"{self.results}/success/{self.filter_judge}/tau{tau}/c{int(c)}.parquet" for c in self.config["success"]["caps"]]


class RunPlan:
    """Every model of a run: one ``Plan`` per model, the path patterns the rules share, and
    the cross-model outputs (Tables 2-3 and Fig. 9 side by side) when there are several.

    The single ``model:`` form keeps today's paths (no ``{model}`` wildcard), so a finished
    single-model run has nothing to redo; the ``models:`` form puts each model's tree under
    ``results/lalm/<name>/`` and the rules carry a ``{model}`` wildcard. The corpus and the
    embedded judge stay shared: adding a model reruns none of them, only its own jobs.
    """

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.multi = is_multi(config)
        self.plans = {name: Plan(config, name) for name in model_entries(config)}
        self.names = list(self.plans)
        self.results = str(config["results"]).rstrip("/")
        self.cross_tables_dir = f"{self.results}/tables"
        self.cross_figure = f"{self.results}/figures/layers_models.png"
        self.cross_report = f"{self.results}/report.md"

    @property
    def single(self) -> Plan:
        return self.plans[self.names[0]]

    def pattern(self, relative: str) -> str:
        """A per-model path pattern: ``results/<relative>`` or ``results/lalm/{model}/<relative>``."""
        return f"{self.results}/{LALM_DIR}/{{model}}/{relative}" if self.multi else f"{self.results}/{relative}"

    def of(self, wildcards) -> Plan:
        """The plan of the model a job belongs to (its ``{model}`` wildcard, else the only one)."""
        if not self.multi:
            return self.single
        return self.plans[wildcards.model]

    def any_plan(self, test: Callable[[Plan], Any]) -> bool:
        return any(test(p) for p in self.plans.values())

    @property
    def cross_model(self) -> bool:
        """Cross-model tables, figure and report: with two models or more."""
        return len(self.plans) >= 2

    def model_constraint(self) -> str:
        return "|".join(sorted(self.plans))

    def expand(self, relative: str | Callable[[Plan], str | list[str]]) -> list[str]:
        """One path per model: a relative path, or a function of the model's plan."""
        out = []
        for plan in self.plans.values():
            got = relative(plan) if callable(relative) else f"{plan.results}/{relative}"
            out += [got] if isinstance(got, str) else list(got)
        return out

    def per_model(self, relative: str) -> dict[str, str]:
        return {name: f"{plan.results}/{relative}" for name, plan in self.plans.items()}

    def anchor_masks(self) -> dict[str, str]:
        """Each model's anchor-selector mask at the anchor cell: the panels of the cross-model Fig. 9."""
        return {name: plan.kit_variant.mask_path(plan.anchor_selector) for name, plan in self.plans.items()}

    @staticmethod
    def cross_args(name_to_path: dict[str, str]) -> list[str]:
        """``name=path`` items in config order (the rule quotes each)."""
        return [f"{n}={p}" for n, p in name_to_path.items()]

    def targets(self) -> list[str]:
        """What `rule all` asks for: each model's report, Table 3 and human part, and the
        cross-model report (which needs the cross tables and figure) with several models."""
        out = []
        for plan in self.plans.values():
            out += [f"{plan.results}/report.md", f"{plan.results}/tables/table3_selectors.md", *plan.human_targets()]
        if self.cross_model:
            out.append(self.cross_report)
        return out
