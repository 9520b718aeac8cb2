"""The listening kit (SPEC §7 "Human evaluation"): which trials it holds and the static folder.

A/B pairs and label items are drawn by seeded rules from the evaluation and identification
attempts; every clip gets an opaque id (a digest of the trial set and the attempt), and the
*key* that maps clips back to attempts (table ``kit_key``) stays with the workflow. The
folder is static HTML + JS (``esn_core/kit/``) and loudness-normalised clips, so it works
opened from disk or served by any web server.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from esn_core.constants import TARGETS

KIT_ASSETS = Path(__file__).with_name("kit")


def _draw(ids: Sequence[str], n: int, seed: int, stream: int) -> list[str]:
    """``n`` of the sorted ``ids`` (all if fewer), seeded per stream so emotions draw independently."""
    ids = sorted(ids)
    if len(ids) <= n:
        return ids
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4B17, stream]))
    return sorted(ids[i] for i in rng.choice(len(ids), size=n, replace=False))


def choose_pairs(attempts: pl.DataFrame, selector: str, per_emotion: int, seed: int) -> pl.DataFrame:
    """A/B pairs from one evaluated variant: per target emotion, ``per_emotion`` sources drawn
    by a seeded rule; each pair is the source's baseline attempt and its attempt with the
    ``selector``'s own-emotion mask (the self condition the paper's listeners heard).

    Columns: pair_id, emotion, source_id, baseline_id, baseline_audio, intervened_id, intervened_audio.
    """
    base = attempts.filter(pl.col("condition") == "baseline")
    steered = attempts.filter((pl.col("condition") == selector) & (pl.col("mask_emotion") == pl.col("target_emotion")))
    joined = base.join(steered, on=["source_id", "target_emotion"], suffix="_x", how="inner")
    if joined.is_empty():
        raise ValueError(f"no (baseline, {selector}) pairs with the same source and target in the evaluation attempts")
    rows = []
    for k, emotion in enumerate(TARGETS):
        part = joined.filter(pl.col("target_emotion") == emotion)
        for source in _draw(part["source_id"].to_list(), per_emotion, seed, k):
            r = part.filter(pl.col("source_id") == source).row(0, named=True)
            rows.append({"emotion": emotion, "source_id": source,
                         "baseline_id": r["attempt_id"], "baseline_audio": r["audio_path"],
                         "intervened_id": r["attempt_id_x"], "intervened_audio": r["audio_path_x"]})
    frame = pl.DataFrame(rows)
    return frame.with_columns(pair_id=pl.format("p{}", pl.int_range(1, frame.height + 1).cast(pl.Utf8).str.zfill(3))) \
        .select("pair_id", *frame.columns)


def choose_label_items(attempts: pl.DataFrame, per_emotion: int, seed: int) -> pl.DataFrame:
    """Identification attempts offered for labelling: ``per_emotion`` per target, seeded.

    Columns: attempt_id, emotion, audio_path.
    """
    parts = []
    for k, emotion in enumerate(TARGETS):
        part = attempts.filter(pl.col("target_emotion") == emotion)
        chosen = _draw(part["attempt_id"].to_list(), per_emotion, seed, 100 + k)
        parts.append(part.filter(pl.col("attempt_id").is_in(chosen)))
    return pl.concat(parts).select("attempt_id", pl.col("target_emotion").alias("emotion"), "audio_path") \
        .sort("attempt_id")


def _clip_id(kit_id: str, attempt_id: str) -> str:
    return "c" + hashlib.blake2b(f"{kit_id}|{attempt_id}".encode(), digest_size=5).hexdigest()


def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=6).hexdigest()


def label_key(items: pl.DataFrame, seed: int) -> pl.DataFrame:
    """The key of the labelling task: item (l001...), clip, role 'label', attempt_id, emotion,
    audio_path, set_id. It depends on the identification attempts only, so CAS-H never waits
    for an evaluation; clip ids digest the label set, so answers to another set do not match."""
    set_id = _digest({"items": items.to_dicts(), "seed": seed})
    rows = [{"task": "label", "item": f"l{i:03d}", "clip": _clip_id(set_id, it["attempt_id"]), "role": "label",
             "attempt_id": it["attempt_id"], "emotion": it["emotion"], "audio_path": it["audio_path"],
             "set_id": set_id}
            for i, it in enumerate(items.iter_rows(named=True), start=1)]
    return pl.DataFrame(rows, schema=KEY_SCHEMA)


def ab_key(pairs: pl.DataFrame, labels: pl.DataFrame, seed: int) -> pl.DataFrame:
    """The key of the A/B task (two rows per pair: role baseline / intervened); its set_id is
    the kit id, a digest of the pairs and the label set."""
    kit_id = _digest({"pairs": pairs.to_dicts(), "labels": labels["set_id"].unique().to_list(), "seed": seed})
    rows = []
    for p in pairs.iter_rows(named=True):
        for role in ("baseline", "intervened"):
            attempt = p[f"{role}_id"]
            rows.append({"task": "ab", "item": p["pair_id"], "clip": _clip_id(kit_id, attempt), "role": role,
                         "attempt_id": attempt, "emotion": p["emotion"], "audio_path": p[f"{role}_audio"],
                         "set_id": kit_id})
    return pl.DataFrame(rows, schema=KEY_SCHEMA)


KEY_SCHEMA = {c: pl.Utf8 for c in ("task", "item", "clip", "role", "attempt_id", "emotion", "audio_path", "set_id")}


def write_kit(key: pl.DataFrame, out_dir, audio_root=".", title: str = "ESN listening test") -> dict:
    """The self-contained kit folder: index.html, kit.js, kit.css, trials.js and clips/*.wav
    (each loudness-normalised to -23 LUFS). Built beside ``out_dir`` and renamed onto it, so
    an interrupted build leaves no half kit. Returns a summary (clips, gains)."""
    import soundfile as sf

    from esn_core.loudness import TARGET_LUFS, normalise

    kit_id = key.filter(pl.col("task") == "ab")["set_id"][0]
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "clips").mkdir(parents=True)
    gains = []
    for clip, path in key.select("clip", "audio_path").unique(maintain_order=True).iter_rows():
        samples, rate = sf.read(Path(audio_root) / path, dtype="float64", always_2d=False)
        if samples.ndim > 1:
            samples = samples.mean(axis=1)
        scaled, gain = normalise(samples, rate, TARGET_LUFS)
        sf.write(tmp / "clips" / f"{clip}.wav", scaled, rate, subtype="PCM_16")
        gains.append(gain)
    from esn_core.human import AB_ANSWERS, ANSWER_COLUMNS, LABEL_ANSWERS

    trials = {
        "kit": kit_id, "title": title, "labels": list(LABEL_ANSWERS), "ab_answers": list(AB_ANSWERS),
        "columns": list(ANSWER_COLUMNS),
        # clips of a pair in sorted (opaque) order: the file does not say which is intervened
        "ab": [{"item": item, "emotion": g["emotion"][0], "clips": sorted(g["clip"].to_list())}
               for item, g in trial_groups(key.filter(pl.col("task") == "ab"))],
        "label": [{"item": item, "clips": g["clip"].to_list()}
                  for item, g in trial_groups(key.filter(pl.col("task") == "label"))],
    }
    # A script, not JSON: browsers refuse fetch() of file:// pages, but load <script src>.
    (tmp / "trials.js").write_text("window.ESN_KIT = " + json.dumps(trials, indent=1) + ";\n", encoding="utf-8")
    for asset in ("index.html", "kit.js", "kit.css"):
        shutil.copyfile(KIT_ASSETS / asset, tmp / asset)
    for p in [tmp, *tmp.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"kit": kit_id, "clips": len(gains), "ab_pairs": len(trials["ab"]), "label_items": len(trials["label"]),
            "gain_db_min": min(gains) if gains else None, "gain_db_max": max(gains) if gains else None}


def trial_groups(frame: pl.DataFrame):
    """(item, its key rows) in the key's order: one A/B pair (two clips) or one label item."""
    for item in frame["item"].unique(maintain_order=True).to_list():
        yield item, frame.filter(pl.col("item") == item)
