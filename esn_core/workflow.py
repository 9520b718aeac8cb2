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

    def mask_args(self) -> list[str]:
        """``selector=path`` items of the evaluate command (the rule quotes each)."""
        return [f"{s}={self.mask_path(s)}" for s in self.selectors]

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("results")
        d["selectors"] = list(self.selectors)
        return json.dumps(d, sort_keys=True)


class Plan:
    """Config -> paths, variants and command-line arguments for the rules."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.results = str(config["results"]).rstrip("/")
        model = config["model"]
        self.gpus = int(model.get("gpus", 1))
        self.model_mem_mb = int(model.get("mem_mb", 16000))
        self.model_runtime_min = int(model.get("runtime_min", 240))
        self.capture_groups = list(dict.fromkeys(config["capture"]["groups"]))
        judges = config["judges"]
        # judges.available is a list (an override replaces it whole); looked up by name here
        self.judges = {entry["name"]: dict(entry) for entry in judges["available"]}
        self.filter_judge = judges["filter"]
        self.report_judges = list(dict.fromkeys([judges["filter"], *judges["report"]]))
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
                records[v.mask_path(s)] = dict(selector=s, group=v.group, rate=v.rate, cap=v.cap, path=v.mask_path(s))
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
        return max(1, math.ceil(n / int(self.config["model"]["shard_sources"])))

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
                f"--source demo --demo-tree {shlex.quote(self.results + '/corpus/demo_esd')}"
                f" --demo-speakers {demo['speakers']} --demo-utterances {demo['utterances']}"
                f" --seed {self.config['seed']}{spk}"
            )
        return (
            f"--source esd --esd-root {shlex.quote(str(corpus['esd_root']))}"
            f" --cache-dir {shlex.quote(self.results + '/corpus/resampled')}{spk}"
        )

    def model_path(self) -> str:
        model = self.config["model"]
        if model.get("path"):
            return str(model["path"])
        if model["adapter"] != "planted":
            raise ValueError(f"config model.path is required for adapter {model['adapter']!r}")
        return f"{self.results}/models/planted"

    def model_inputs(self) -> list[str]:
        model = self.config["model"]
        if model["adapter"] == "planted" and not model.get("path"):
            return [f"{self.results}/models/planted/config.json"]
        return []

    def model_json(self) -> str:
        model = self.config["model"]
        return json.dumps({"adapter": model["adapter"], "path": self.model_path(), "options": model.get("options") or {}})

    def judge_spec(self, name: str) -> dict[str, Any]:
        spec = dict(self.judges[name])
        if spec["kind"] == "embedded" and not spec.get("path"):
            spec["path"] = f"{self.results}/judges/embedded.json"
        return spec

    def judge_inputs(self, name: str) -> list[str]:
        spec = self.judges.get(name)
        if spec is None:
            raise KeyError(f"judge {name!r} is not defined under judges.available")
        if spec["kind"] == "embedded" and not spec.get("path"):
            return [f"{self.results}/judges/embedded.json"]
        return []

    def judge_json(self, name: str) -> str:
        return json.dumps(self.judge_spec(name), sort_keys=True)

    def judge_gpus(self, name: str) -> int:
        return 0 if self.judge_spec(name)["kind"] == "embedded" else self.gpus

    def naturalness_json(self) -> str:
        return json.dumps(self.config["judges"].get("naturalness"))

    def human_labels_arg(self) -> str:
        path = self.config["success"].get("human_labels")
        return f"--human-labels {shlex.quote(str(path))}" if path else ""

    def max_sources_arg(self) -> str:
        cap = self.config["evaluation"].get("max_sources")
        return f"--max-sources {int(cap)}" if cap is not None else ""

    # -- targets -------------------------------------------------------------------
    def success_paths(self) -> list[str]:
        tau = _num(self.config["success"]["tau_wer"])
        return [f"{self.results}/success/{self.filter_judge}/tau{tau}/c{int(c)}.parquet" for c in self.config["success"]["caps"]]
