"""``esn``: one subcommand per workflow stage, each a thin call into the library.

Every Snakemake rule runs ``python -m esn_core.cli <stage> ...``; the same commands work by
hand, which is how a stage is debugged or rerun outside the workflow. Each command reads
its inputs, calls ``esn_core`` and writes its outputs atomically with provenance.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import polars as pl

from esn_core import __version__, io, stats
from esn_core.constants import TARGETS

log = logging.getLogger("esn")


# ------------------------------------------------------------------------------ helpers


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(int(n))


def _write(frame: pl.DataFrame, path: str, name: str, **provenance) -> None:
    io.write_table(frame.to_arrow(), path, name, provenance)
    log.info("wrote %s (%d rows)", path, frame.height)


def _read(paths: list[str], name: str) -> pl.DataFrame:
    frames = [io.read_frame(p, name) for p in paths]
    return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()


def _shard(sources: pl.DataFrame, shard: int, size: int, max_sources: int | None = None) -> pl.DataFrame:
    """Sources ``[shard*size, (shard+1)*size)`` of the sorted list (after the optional cap)."""
    if max_sources is not None:
        sources = sources.head(max_sources)
    part = sources.slice(shard * size, size)
    if part.is_empty():
        raise ValueError(f"shard {shard} of size {size} is empty ({sources.height} sources)")
    return part


def _load_adapter(spec_json: str):
    from esn_core.models import load_adapter

    spec = json.loads(spec_json)
    return load_adapter(spec["adapter"], path=spec["path"], **(spec.get("options") or {})), spec


# ------------------------------------------------------------------------------ stages


def cmd_corpus(a) -> None:
    from esn_core.corpus import read_esd, write_manifest

    if a.source == "demo":
        from esn_core.demo_corpus import generate_demo_corpus

        root = generate_demo_corpus(a.demo_tree, a.demo_speakers, a.demo_utterances, a.seed, workers=a.threads)
        manifest = read_esd(root, a.speakers)
    else:
        manifest = read_esd(a.esd_root, a.speakers, cache_dir=a.cache_dir)
    write_manifest(manifest, a.out, {"source": a.source, "seed": a.seed})
    counts = manifest.filter(pl.col("emotion") == "neutral").group_by("split").len().sort("split")
    log.info("neutral sources per split: %s", dict(counts.iter_rows()))


def cmd_plant(a) -> None:
    from esn_core.models.planted import plant_model, planted_ground_truth

    model = plant_model(a.seed, n_layers=a.layers)
    model.save_pretrained(a.out)
    io.write_table(planted_ground_truth(model), Path(a.out) / "ground_truth.parquet", "masks",
                   {"seed": a.seed, "model": "planted"})
    log.info("planted model with known emotion neurons saved to %s", a.out)


def cmd_calibrate_judge(a) -> None:
    from esn_core.corpus import read_manifest
    from esn_core.judges.embedded import EmbeddedJudge

    manifest = read_manifest(a.manifest)
    by_split = manifest.group_by("split").agg(pl.col("speaker").unique())
    speakers = {s: sorted(v) for s, v in by_split.iter_rows()}
    train = speakers.get("identification", [])
    judge = EmbeddedJudge.calibrate(manifest, train)
    unseen = [s for s in speakers.get("test_unseen", []) if s not in train]
    if unseen:
        report = judge.held_out_report(manifest, unseen)
        log.info("embedded judge held-out accuracy on unseen speakers %s: %.3f (n=%d)",
                 unseen, report["accuracy"], report["n"])
    # Every speaker's neutral recordings become its reference (the EVC source is neutral).
    for speaker in sorted(manifest["speaker"].unique()):
        neutral = manifest.filter((pl.col("speaker") == speaker) & (pl.col("emotion") == "neutral"))
        judge.add_speaker_reference(speaker, neutral["path"].to_list())
    judge.save(a.out)


def cmd_sample(a) -> None:
    from esn_core.corpus import read_manifest
    from esn_core.hooks import Capture
    from esn_core.pipeline import neutral_sources, plan_attempts, sample_attempts

    _set_threads(a.threads)
    adapter, spec = _load_adapter(a.model)
    sources = _shard(neutral_sources(read_manifest(a.manifest), a.split), a.shard, a.shard_size)
    plan = plan_attempts(sources, TARGETS, a.seed)
    groups = dict(item.split("=", 1) for item in a.counts)
    capture = {g: Capture(a.count_positions, a.moments) for g in groups}
    attempts, counts = sample_attempts(adapter, plan, a.audio_dir, batch_size=a.batch_size, capture=capture)
    prov = {"model": spec["path"], "adapter": spec["adapter"], "split": a.split, "shard": a.shard, "seed": a.seed}
    for group, path in groups.items():
        c = counts[group]
        stats.write_counts(path, c.attempt_ids, c.K, c.T, c.layout, {**prov, "group": group})
    _write(attempts, a.attempts, "attempts", **prov)


def cmd_judge(a) -> None:
    from esn_core.judges.registry import judgement_rows, load_judge, load_mos_estimator

    spec = json.loads(a.judge)
    name = spec.pop("name")
    # The LALM under test may never judge itself (SPEC §3: the judge is held out).
    judge = load_judge(spec, model_under_test=a.model_under_test)
    judge.name = name
    estimator = load_mos_estimator(json.loads(a.naturalness))
    judgements = judgement_rows(judge, _read([a.attempts], "attempts"), estimator)
    _write(judgements, a.out, "judgements", judge=name, kind=spec["kind"], attempts=a.attempts)


def cmd_success(a) -> None:
    from esn_core.success import human_success_table, success_summary, success_table

    attempts = _read(a.attempts, "attempts")
    if a.human_labels:
        labels = pl.from_arrow(io.read_table(a.human_labels, "human_labels"))
        table = human_success_table(attempts, labels, a.tau, a.cap, a.seed)
    else:
        table = success_table(attempts, _read(a.judgements, "judgements"), a.tau, a.cap, a.seed)
    log.info("success sets:\n%s", success_summary(table))
    _write(table, a.out, "success", judge=a.judge, tau_wer=a.tau, cap=a.cap, seed=a.seed,
           labels=a.human_labels or a.judgements)


def _answer_files(paths: list[str]) -> list[Path]:
    from esn_core.human import listener_files

    files = [f for p in paths for f in listener_files(p)]
    if not files:
        raise FileNotFoundError(f"no listener files (*.csv) in {paths}")
    log.info("listener files: %d (%s)", len(files), ", ".join(f.name for f in files[:5]) + (" ..." if len(files) > 5 else ""))
    return files


def cmd_label_items(a) -> None:
    from esn_core.listening_kit import choose_label_items, label_key

    items = choose_label_items(_read(a.attempts, "attempts"), a.per_emotion, a.seed)
    _write(label_key(items, a.seed), a.out, "kit_key", task="label", per_emotion=a.per_emotion, seed=a.seed)


def cmd_kit(a) -> None:
    from esn_core.listening_kit import ab_key, choose_pairs, write_kit

    labels = pl.from_arrow(io.read_table(a.label_key, "kit_key"))
    pairs = choose_pairs(_read(a.attempts, "attempts"), a.selector, a.pairs_per_emotion, a.seed)
    key = ab_key(pairs, labels, a.seed)
    summary = write_kit(pl.concat([key, labels]), a.out_dir, audio_root=a.audio_root)
    log.info("listening kit %s: %s", a.out_dir, json.dumps(summary))
    _write(key, a.key, "kit_key", task="ab", kit=summary["kit"], selector=a.selector,
           pairs_per_emotion=a.pairs_per_emotion, seed=a.seed)


def cmd_simulate_listeners(a) -> None:
    from esn_core.human import simulate_listeners

    key = pl.concat([pl.from_arrow(io.read_table(p, "kit_key")) for p in (a.ab_key, a.label_key)])
    judged = _read(a.judgements, "judgements")
    heard = dict(judged.select("attempt_id", "label").iter_rows())
    files = simulate_listeners(key, heard, a.listeners, a.noise, a.seed)
    out = Path(a.out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, frame in files.items():
        frame.write_csv(tmp / f"{name}.csv")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    log.info("simulated %d listeners (noise %.2f) in %s", len(files), a.noise, out)


def cmd_import_labels(a) -> None:
    from esn_core.human import import_labels, read_answers

    answers = read_answers(_answer_files(a.answers))
    key = pl.from_arrow(io.read_table(a.label_key, "kit_key"))
    attempt_ids = _read(a.attempts, "attempts")["attempt_id"].to_list()
    labels = import_labels(answers, key, attempt_ids)
    log.info("human labels: %d attempts labelled by %d listener(s); %d with no majority emotion",
             labels.height, answers.filter(pl.col("task") == "label")["listener"].n_unique(),
             labels["label"].null_count())
    _write(labels, a.out, "human_labels", judge="human", files=sorted(set(answers["file"])))


def cmd_import_ab(a) -> None:
    from esn_core.human import ab_figure, ab_summary, import_ab, read_answers
    from esn_core.plots import save_figure
    from esn_core.report import write_frame

    answers = import_ab(read_answers(_answer_files(a.answers)), pl.from_arrow(io.read_table(a.ab_key, "kit_key")))
    _write(answers, a.out, "ab_answers", files=sorted(set(answers["file"])))
    summary = ab_summary(answers, a.bootstrap, a.seed)
    log.info("A/B preference:\n%s", summary)
    title = (f"Fig. 8 — human A/B preference of the intervened clip: win / tie / loss % per emotion and average, "
             f"95% bootstrap CIs over pairs and listeners (B={a.bootstrap})")
    write_frame(summary, Path(a.table).parent, Path(a.table).stem, title,
                {"n_boot": a.bootstrap, "seed": a.seed, "answers": a.out})
    save_figure(ab_figure(summary), Path(a.figure).parent)


def cmd_probs(a) -> None:
    success = _read([a.success], "success")
    kept = {
        e: success.filter(pl.col("kept") & (pl.col("emotion") == e))["attempt_id"].to_list()
        for e in success["emotion"].unique(maintain_order=True).to_list()
    }
    agg = stats.aggregate(a.counts, kept)
    if agg.excluded:
        log.warning("emotions with an empty success set, excluded from selection: %s", agg.excluded)
    io.write_table(stats.probs_table(agg), a.out, "probs",
                   {"layer_sizes": agg.layout.to_json(), "excluded": agg.excluded,
                    "n_attempts": agg.n_attempts})


def cmd_masks(a) -> None:
    from esn_core.layout import NeuronLayout
    from esn_core.select import ActivationProbabilities, masks_to_table, select

    prov = io.read_provenance(a.probs)
    layout = NeuronLayout(tuple(prov["layer_sizes"]))
    counts = stats.counts_from_probs_table(io.read_table(a.probs, "probs"), layout)
    probs, excluded = ActivationProbabilities.from_counts(counts, layout)
    excluded = sorted(set(excluded) | set(prov.get("excluded", [])))
    emotions = [e for e in a.emotions if e in probs.emotions]
    targets = [e for e in TARGETS if e in emotions]
    masks = select(a.selector, probs.subset(emotions), a.rate, targets=targets, seed=a.seed,
                   lape_percentile=a.lape_percentile)
    for e, m in masks.items():
        log.info("%s mask %s: %d of %d requested", a.selector, e, m.size, m.requested)
    io.write_table(masks_to_table(masks, layout), a.out, "masks",
                   {"selector": a.selector, "rate": a.rate, "seed": a.seed, "excluded": excluded,
                    "layer_sizes": layout.to_json()})


def cmd_evaluate(a) -> None:
    from esn_core.corpus import read_manifest
    from esn_core.pipeline import Condition, evaluate_conditions, neutral_sources
    from esn_core.select import masks_from_table

    _set_threads(a.threads)
    adapter, spec = _load_adapter(a.model)
    layout = adapter_layout(adapter, a.group)
    conditions = []
    for item in a.masks:
        selector, path = item.split("=", 1)
        masks = masks_from_table(io.read_table(path, "masks"), layout)
        conditions.append(Condition(selector, a.group, a.method, a.alpha,
                                    {e: np.asarray(m.indices) for e, m in masks.items()}))
    sources = _shard(neutral_sources(read_manifest(a.manifest), a.split), a.shard, a.shard_size, a.max_sources)
    attempts = evaluate_conditions(adapter, sources, conditions, a.audio_dir, seed=a.seed, batch_size=a.batch_size)
    _write(attempts, a.out, "attempts", model=spec["path"], split=a.split, shard=a.shard,
           group=a.group, method=a.method, alpha=a.alpha)


def adapter_layout(adapter, group: str):
    from esn_core.hooks import HookEngine

    return HookEngine(adapter.groups()).layout(group)


def cmd_collect(a) -> None:
    from esn_core.evaluate import EVAL_COLUMNS

    variant = json.loads(a.variant)
    attempts = _read(a.attempts, "attempts")
    if variant.get("condition_suffix"):
        # CAS-H's variant: same sources, seeds and model as the anchor's, so its baseline rows
        # equal the anchor's; only its intervened rows join the anchor in the tables.
        attempts = attempts.filter(pl.col("condition") != "baseline")
    judgements = _read(a.judgements, "judgements").filter(pl.col("judge").is_in(a.judges))
    joined = judgements.join(attempts, on="attempt_id", how="inner", validate="m:1")
    missing = attempts.height * len(a.judges) - joined.height
    if missing:
        raise ValueError(f"{missing} (attempt, judge) pairs have no judgement")
    columns = ["judge", "split", "speaker", *[c for c in EVAL_COLUMNS if c not in ("judge", "split", "speaker")],
               "mos_estimator"]
    frame = joined.select(list(dict.fromkeys(columns))).with_columns(
        pl.lit(int(variant["cap"])).alias("cap"), pl.lit(variant["group"]).alias("group"),
        pl.lit(float(variant["rate"])).alias("rate"), pl.lit(variant["method"]).alias("method"),
        pl.lit(float(variant["alpha"])).alias("alpha"), pl.lit(float(variant["tau"])).alias("tau"),
        pl.lit(variant["judge"]).alias("filter_judge"),
    )
    with io.atomic_path(a.out) as tmp:
        frame.write_parquet(tmp, compression="zstd")


def cmd_concat(a) -> None:
    frame = pl.concat([io.read_frame(p) for p in a.inputs], how="vertical_relaxed")
    with io.atomic_path(a.out) as tmp:
        frame.write_parquet(tmp, compression="zstd")


def _mask_inputs(masks_json: str):
    from esn_core.layout import NeuronLayout

    records = json.loads(masks_json)
    layouts = {}
    for r in records:
        layouts.setdefault(r["group"], NeuronLayout(tuple(io.read_provenance(r["path"])["layer_sizes"])))
    return records, layouts


def cmd_tables(a) -> None:
    from esn_core.report import write_tables

    records, layouts = _mask_inputs(a.masks)
    write_tables(io.read_frame(a.evaluation), records, layouts, json.loads(a.anchor), a.out_dir,
                 n_boot=a.bootstrap, seed=a.seed)


def cmd_figures(a) -> None:
    import shutil

    from esn_core.plots import write_figures

    records, layouts = _mask_inputs(a.masks)
    paths = write_figures(io.read_frame(a.evaluation), records, layouts, json.loads(a.anchor), a.out_dir,
                          n_boot=a.bootstrap, seed=a.seed)
    anchor = json.loads(a.anchor)["selector"]
    wanted = [p for p in map(Path, paths) if p.suffix == ".png" and p.stem == f"delta_heatmap_{anchor}"]
    if not wanted:
        raise FileNotFoundError(f"figures wrote no delta_heatmap_{anchor}.png")
    with io.atomic_path(a.headline) as tmp:
        shutil.copyfile(wanted[0], tmp)


def cmd_report(a) -> None:
    from esn_core.report import markdown_report

    text = markdown_report(a.tables_dir, a.figures_dir)
    if a.ab_table or Path(a.tables_dir, "table3_selectors.parquet").exists():
        from esn_core.human import report_section

        text += report_section(a.tables_dir, a.ab_table, a.ab_figure, link_base=Path(a.out).parent)
    with io.atomic_path(a.out) as tmp:
        tmp.write_text(text)


def _named_paths(items: list[str], flag: str) -> dict[str, str]:
    """``name=path`` items -> {name: path}, in the order given."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag}: {item!r} is not name=path")
        if name in out:
            raise SystemExit(f"{flag}: model {name!r} given twice")
        out[name] = path
    return out


def cmd_cross_model(a) -> None:
    from esn_core.cross_model import write_cross_model

    tables = _named_paths(a.tables, "--tables")
    masks = _named_paths(a.masks, "--masks")
    if list(tables) != list(masks):
        raise SystemExit(f"--tables names {list(tables)} and --masks names {list(masks)} differ")
    write_cross_model(tables, masks, json.loads(a.anchor), a.out_dir, a.figure, a.report)


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="esn", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"esn_core {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("corpus", help="ESD tree or demo corpus -> manifest")
    s.add_argument("--source", choices=["demo", "esd"], required=True)
    s.add_argument("--esd-root")
    s.add_argument("--cache-dir")
    s.add_argument("--demo-tree")
    s.add_argument("--demo-speakers", type=int, default=5)
    s.add_argument("--demo-utterances", type=int, default=40)
    s.add_argument("--speakers", nargs="*")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_corpus)

    s = sub.add_parser("plant", help="plant and save the demo LALM with known emotion neurons")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layers", type=int, default=8, help="decoder layers (config plant_layers)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_plant)

    s = sub.add_parser("calibrate-judge", help="calibrate the embedded acoustic judge")
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_calibrate_judge)

    s = sub.add_parser("sample", help="identification conversions with activation capture")
    _model_args(s)
    s.add_argument("--count-positions", choices=["all", "generated"], default="all")
    s.add_argument("--moments", action="store_true")
    s.add_argument("--attempts", required=True)
    s.add_argument("--counts", nargs="+", required=True, metavar="GROUP=PATH")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("judge", help="judge one attempts file")
    s.add_argument("--judge", required=True, help="judge spec as JSON")
    s.add_argument("--naturalness", default="null", help="MOS estimator spec as JSON (null: none)")
    s.add_argument("--model-under-test", help="the LALM being studied, refused as its own judge")
    s.add_argument("--manifest", required=True)
    s.add_argument("--attempts", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_judge)

    s = sub.add_parser("success", help="success filter and capped success sets")
    s.add_argument("--attempts", nargs="+", required=True)
    s.add_argument("--judgements", nargs="+", required=True)
    s.add_argument("--human-labels", help="imported human labels (table human_labels): the judge 'human'")
    s.add_argument("--judge", default=None, help="the judge's name, recorded in the provenance")
    s.add_argument("--tau", type=float, required=True)
    s.add_argument("--cap", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_success)

    s = sub.add_parser("label-items", help="identification attempts offered to listeners for labelling")
    s.add_argument("--attempts", nargs="+", required=True)
    s.add_argument("--per-emotion", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_label_items)

    s = sub.add_parser("kit", help="the listening kit (A/B pairs + label items) as a static folder")
    s.add_argument("--attempts", nargs="+", required=True, help="the anchor variant's evaluation attempts")
    s.add_argument("--label-key", required=True)
    s.add_argument("--selector", required=True)
    s.add_argument("--pairs-per-emotion", type=int, default=25)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--audio-root", default=".", help="folder the attempts' audio paths are relative to")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--key", required=True, help="where the A/B key (kept out of the kit) is written")
    s.set_defaults(func=cmd_kit)

    s = sub.add_parser("simulate-listeners", help="listener files that follow a judge with noise (demo)")
    s.add_argument("--ab-key", required=True)
    s.add_argument("--label-key", required=True)
    s.add_argument("--judgements", nargs="+", required=True)
    s.add_argument("--listeners", type=int, default=20)
    s.add_argument("--noise", type=float, default=0.2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=cmd_simulate_listeners)

    s = sub.add_parser("import-labels", help="listener label files -> human labels (CAS-H)")
    s.add_argument("--answers", nargs="+", required=True, help="listener files or folders of them")
    s.add_argument("--label-key", required=True)
    s.add_argument("--attempts", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_import_labels)

    s = sub.add_parser("import-ab", help="listener A/B files -> answers, Fig. 8 table and figure")
    s.add_argument("--answers", nargs="+", required=True, help="listener files or folders of them")
    s.add_argument("--ab-key", required=True)
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--table", required=True, help="<dir>/<name>.parquet (.csv and .md beside it)")
    s.add_argument("--figure", required=True, help="<dir>/ab_preference.png (.svg beside it)")
    s.set_defaults(func=cmd_import_ab)

    s = sub.add_parser("probs", help="activation probabilities over success sets")
    s.add_argument("--success", required=True)
    s.add_argument("--counts", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_probs)

    s = sub.add_parser("masks", help="one selector's masks")
    s.add_argument("--probs", required=True)
    s.add_argument("--selector", required=True)
    s.add_argument("--rate", type=float, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--lape-percentile", type=float, default=95.0)
    s.add_argument("--emotions", nargs="+", default=list(TARGETS))
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_masks)

    s = sub.add_parser("evaluate", help="baseline + masked conditions on a test split")
    _model_args(s)
    s.add_argument("--max-sources", type=int)
    s.add_argument("--masks", nargs="+", required=True, metavar="SELECTOR=PATH")
    s.add_argument("--group", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--alpha", type=float, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("collect", help="judged evaluation attempts of one variant")
    s.add_argument("--variant", required=True)
    s.add_argument("--judges", nargs="+", required=True)
    s.add_argument("--attempts", nargs="+", required=True)
    s.add_argument("--judgements", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_collect)

    s = sub.add_parser("concat", help="concatenate Parquet tables")
    s.add_argument("--inputs", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_concat)

    for name, func in (("tables", cmd_tables), ("figures", cmd_figures)):
        s = sub.add_parser(name, help=f"the paper's {name}")
        s.add_argument("--evaluation", required=True)
        s.add_argument("--masks", required=True)
        s.add_argument("--anchor", required=True)
        s.add_argument("--bootstrap", type=int, default=1000)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--out-dir", required=True)
        if name == "figures":
            s.add_argument("--headline", required=True)
        s.set_defaults(func=func)

    s = sub.add_parser("cross-model", help="Tables 2-3, Fig. 9 and the report across several models")
    s.add_argument("--tables", nargs="+", required=True, help="name=tables_dir per model (config order)")
    s.add_argument("--masks", nargs="+", required=True, help="name=anchor mask table per model")
    s.add_argument("--anchor", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--figure", required=True)
    s.add_argument("--report", required=True)
    s.set_defaults(func=cmd_cross_model)

    s = sub.add_parser("report", help="Markdown summary of tables and figures")
    s.add_argument("--tables-dir", required=True)
    s.add_argument("--figures-dir", required=True)
    s.add_argument("--ab-table", help="Fig. 8's table (fig8_ab.parquet), when listeners answered")
    s.add_argument("--ab-figure", help="Fig. 8's figure (ab_preference.png)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_report)
    return p


def _model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--manifest", required=True)
    s.add_argument("--model", required=True, help='{"adapter": ..., "path": ..., "options": {...}}')
    s.add_argument("--split", required=True)
    s.add_argument("--shard", type=int, required=True)
    s.add_argument("--shard-size", type=int, required=True)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--audio-dir", required=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
