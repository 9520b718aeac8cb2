"""Human evaluation (SPEC §7 "Human evaluation", paper §5.4): the listening kit's trials, the
import of what listeners send back, the A/B preference statistics of Fig. 8 and simulated
listeners for the embedded default.

Two tasks share one kit and one answer format:

- ``ab``: a blind pair (baseline, intervened) of the anchor condition, same source and
  instruction; the answer is ``A``, ``B`` or ``indecisive``. An answer is a *win* when the
  intervened clip is chosen, a *loss* when the baseline is, a *tie* when indecisive.
- ``label``: one identification attempt; the answer is one of ``LABEL_ANSWERS`` (the five
  emotions or ``unclear``). Per attempt the majority answer is its human label (CAS-H).

The kit (``esn_core.listening_kit``) only ever shows opaque clip ids; which clip is which
attempt (and which side of a pair is intervened) lives in the *key* (table ``kit_key``),
which stays with the workflow. A listener's answers come back as one CSV
(``ANSWER_COLUMNS``), one row per trial.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import polars as pl

from esn_core.constants import EMOTIONS, TARGETS
from esn_core.listening_kit import trial_groups

log = logging.getLogger(__name__)

HUMAN = "human"  # the judge name of human labels (paths, provenance, Table 3's CAS-H row)
AB_ANSWERS: tuple[str, ...] = ("A", "B", "indecisive")
LABEL_ANSWERS: tuple[str, ...] = (*EMOTIONS, "unclear")
ANSWER_COLUMNS: tuple[str, ...] = ("kit", "listener", "task", "trial", "item", "clip_a", "clip_b", "answer")
OUTCOMES: tuple[str, ...] = ("win", "tie", "loss")


class ListenerFileError(ValueError):
    """A listener file that cannot be imported; the message names the file and the row."""


# ---------------------------------------------------------------------------- import


def listener_files(folder_or_file) -> list[Path]:
    """The listener files of a folder (``*.csv``, sorted), or the one file given."""
    path = Path(folder_or_file)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() == ".csv" and not p.name.startswith("."))
    return [path]


def read_answers(paths: Iterable) -> pl.DataFrame:
    """Every row of the listener files, with ``file`` and ``row`` (the line number in the file).

    A kit export has ``ANSWER_COLUMNS``; a plain two-column ``attempt_id,human_label`` file (one
    labeller, ids in the clear) is read as label answers by a listener named after the file.
    """
    frames = []
    for path in map(Path, paths):
        try:
            with path.open(newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                header = reader.fieldnames or []
                records = [(reader.line_num, r) for r in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ListenerFileError(f"{path}: cannot be read as CSV: {exc}") from exc
        if {"attempt_id", "human_label"} <= set(header):
            rows = [{"kit": None, "listener": path.stem, "task": "label", "trial": None, "item": r["attempt_id"],
                     "clip_a": None, "clip_b": None, "answer": r["human_label"], "file": str(path), "row": n}
                    for n, r in records]
        else:
            missing = [c for c in ANSWER_COLUMNS if c not in header]
            if missing:
                raise ListenerFileError(f"{path}: missing column(s) {missing}; a kit export has {list(ANSWER_COLUMNS)}"
                                        f" (or give attempt_id,human_label)")
            rows = [{**{c: (r[c] if r[c] != "" else None) for c in ANSWER_COLUMNS}, "file": str(path), "row": n}
                    for n, r in records]
        frames.append(pl.DataFrame(rows, schema={**{c: pl.Utf8 for c in ANSWER_COLUMNS}, "file": pl.Utf8,
                                                 "row": pl.Int64}))
    if not frames:
        raise ListenerFileError("no listener files given")
    return pl.concat(frames)


def _fail(row: Mapping, message: str):
    raise ListenerFileError(f"{row['file']} row {row['row']}: {message}")


def _check_common(answers: pl.DataFrame, task: str, kit_id: str | None) -> pl.DataFrame:
    rows = answers.filter(pl.col("task") == task)
    for r in answers.filter(~pl.col("task").is_in(["ab", "label"]).fill_null(False)).head(1).iter_rows(named=True):
        _fail(r, f"task {r['task']!r} is neither 'ab' nor 'label'")
    for r in rows.filter(pl.col("listener").is_null()).head(1).iter_rows(named=True):
        _fail(r, "no listener name")
    if kit_id is not None:
        for r in rows.filter(pl.col("kit").is_not_null() & (pl.col("kit") != kit_id)).head(1).iter_rows(named=True):
            _fail(r, f"answers kit {r['kit']!r}, but this workflow's kit is {kit_id!r} (a file from another kit?)")
    dup = rows.filter(pl.struct("listener", "item").is_duplicated())
    if dup.height:
        first = dup.row(0, named=True)
        other = dup.filter((pl.col("listener") == first["listener"]) & (pl.col("item") == first["item"]))
        where = ", ".join(f"{r['file']} row {r['row']}" for r in other.iter_rows(named=True))
        _fail(first, f"duplicate answer: listener {first['listener']!r} answered {task} item {first['item']!r} "
                     f"more than once ({where})")
    return rows


def import_ab(answers: pl.DataFrame, key: pl.DataFrame) -> pl.DataFrame:
    """Validated A/B answers -> one row per (listener, pair): listener, pair_id, emotion, outcome, file, row."""
    rows = _check_common(answers, "ab", key["set_id"][0])
    pairs = {item: g for item, g in trial_groups(key.filter(pl.col("task") == "ab"))}
    out = []
    for r in rows.iter_rows(named=True):
        pair = pairs.get(r["item"])
        if pair is None:
            _fail(r, f"unknown pair id {r['item']!r} (the kit has {len(pairs)} pairs, {min(pairs)}..{max(pairs)})")
        clips = dict(zip(pair["clip"].to_list(), pair["role"].to_list()))
        if {r["clip_a"], r["clip_b"]} != set(clips):
            _fail(r, f"clips {r['clip_a']!r}, {r['clip_b']!r} are not the clips of pair {r['item']!r}")
        if r["answer"] not in AB_ANSWERS:
            _fail(r, f"answer {r['answer']!r} is not one of {list(AB_ANSWERS)}")
        if r["answer"] == "indecisive":
            outcome = "tie"
        else:
            chosen = r["clip_a"] if r["answer"] == "A" else r["clip_b"]
            outcome = "win" if clips[chosen] == "intervened" else "loss"
        out.append({"listener": r["listener"], "pair_id": r["item"], "emotion": pair["emotion"][0],
                    "outcome": outcome, "file": r["file"], "row": r["row"]})
    if not out:
        raise ListenerFileError(f"no A/B answers in {sorted(set(answers['file']))}")
    return pl.DataFrame(out)


def import_labels(answers: pl.DataFrame, key: pl.DataFrame, attempt_ids: Iterable[str]) -> pl.DataFrame:
    """Validated label answers -> one row per labelled attempt (table ``human_labels``):
    attempt_id, label (the majority answer; null for 'unclear' or a tie), n_answers, n_majority.

    Kit rows name an item of ``key`` and its clip; plain rows (no kit) name the attempt."""
    rows = _check_common(answers, "label", None)
    known = set(attempt_ids)
    items = {item: (clip, attempt) for item, clip, attempt in key.select("item", "clip", "attempt_id").iter_rows()}
    out: dict[str, list[str]] = {}
    for r in rows.iter_rows(named=True):
        if r["kit"] is not None:
            if r["item"] not in items:
                _fail(r, f"unknown label item {r['item']!r} (the kit has {len(items)} label items)")
            clip, attempt = items[r["item"]]
            if r["clip_a"] != clip:
                _fail(r, f"clip {r['clip_a']!r} is not the clip of label item {r['item']!r} (a file from another kit?)")
        else:
            attempt = r["item"]
        if attempt not in known:
            _fail(r, f"unknown attempt id {attempt!r}: not an identification attempt of this workflow")
        answer = (r["answer"] or "").strip().lower()
        answer = "surprise" if answer == "surprised" else answer
        if answer not in LABEL_ANSWERS:
            _fail(r, f"label {r['answer']!r} is not one of {list(LABEL_ANSWERS)}")
        out.setdefault(attempt, []).append(answer)
    table = []
    for attempt in sorted(out):
        votes = out[attempt]
        counts = {a: votes.count(a) for a in LABEL_ANSWERS if a in votes}
        top = max(counts.values())
        winners = [a for a, c in counts.items() if c == top]
        # no majority, or a majority for 'unclear': no emotion label, so never a success
        label = winners[0] if len(winners) == 1 and winners[0] != "unclear" else None
        table.append({"attempt_id": attempt, "label": label, "n_answers": len(votes), "n_majority": top})
    return pl.DataFrame(table, schema={"attempt_id": pl.Utf8, "label": pl.Utf8, "n_answers": pl.Int64,
                                       "n_majority": pl.Int64})


# ---------------------------------------------------------------------------- Fig. 8


def ab_summary(answers: pl.DataFrame, n_boot: int = 1000, seed: int = 0) -> pl.DataFrame:
    """Win / tie / loss % of the intervened clip per emotion and on average ('avg': the mean
    over emotions), with 95% bootstrap CIs that resample pairs (within each emotion) and
    listeners independently, so both sources of variation widen the interval."""
    emotions = [e for e in TARGETS if e in set(answers["emotion"])]
    listeners = sorted(set(answers["listener"]))
    li = np.array([listeners.index(x) for x in answers["listener"]])
    pairs = sorted(set(answers["pair_id"]))
    pi = np.array([pairs.index(x) for x in answers["pair_id"]])
    outcome = np.array([OUTCOMES.index(x) for x in answers["outcome"]])
    emo_of_pair = dict(zip(answers["pair_id"], answers["emotion"]))
    pair_groups = [np.array([pairs.index(p) for p in pairs if emo_of_pair[p] == e]) for e in emotions]
    ans_emotion = np.array([emotions.index(x) for x in answers["emotion"]])

    def shares(w_l: np.ndarray, w_p: np.ndarray) -> np.ndarray:
        """[emotion + avg, outcome] shares in % under listener and pair weights."""
        w = w_l[li] * w_p[pi]
        out = np.zeros((len(emotions) + 1, len(OUTCOMES)))
        for k in range(len(emotions)):
            sel = ans_emotion == k
            total = w[sel].sum()
            out[k] = [100 * w[sel & (outcome == o)].sum() / total if total else np.nan for o in range(3)]
        out[-1] = out[:-1].mean(axis=0)
        return out

    point = shares(np.ones(len(listeners)), np.ones(len(pairs)))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xAB]))
    draws = np.empty((int(n_boot), *point.shape))
    for b in range(int(n_boot)):
        w_l = np.bincount(rng.integers(0, len(listeners), len(listeners)), minlength=len(listeners)).astype(float)
        w_p = np.zeros(len(pairs))
        for group in pair_groups:
            np.add.at(w_p, group[rng.integers(0, len(group), len(group))], 1.0)
        draws[b] = shares(w_l, w_p)
    lo, hi = (np.nanpercentile(draws, q, axis=0) if n_boot else np.full_like(point, np.nan) for q in (2.5, 97.5))
    rows = []
    for k, emotion in enumerate([*emotions, "avg"]):
        sub = answers if emotion == "avg" else answers.filter(pl.col("emotion") == emotion)
        row = {"emotion": emotion, "n_pairs": sub["pair_id"].n_unique(), "n_listeners": sub["listener"].n_unique(),
               "n_answers": sub.height}
        for o, name in enumerate(OUTCOMES):
            row[f"{name}_pct"], row[f"{name}_lo"], row[f"{name}_hi"] = point[k, o], lo[k, o], hi[k, o]
        rows.append(row)
    return pl.DataFrame(rows)


def ab_figure(summary: pl.DataFrame):
    """Fig. 8: stacked win / tie / loss bars per emotion and the average, 95% CI on the win share."""
    from esn_core.plots import FigureSpec, _figure

    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    names = summary["emotion"].to_list()
    y = np.arange(len(names))[::-1]
    left = np.zeros(len(names))
    colours = {"win": "#2a9d8f", "tie": "#bdbdbd", "loss": "#e76f51"}
    for name in OUTCOMES:
        values = summary[f"{name}_pct"].to_numpy()
        ax.barh(y, values, left=left, color=colours[name], label=name, height=0.6)
        for yy, x0, v in zip(y, left, values):
            if v >= 6:
                ax.text(x0 + v / 2, yy, f"{v:.0f}", ha="center", va="center", fontsize=8)
        left += values
    win, lo, hi = (summary[c].to_numpy() for c in ("win_pct", "win_lo", "win_hi"))
    ax.errorbar(win, y + 0.36, xerr=[win - lo, hi - win], fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_yticks(y, names)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of answers (intervened clip: win / indecisive / loss)")
    ax.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    n = summary.filter(pl.col("emotion") == "avg").row(0, named=True)
    caption = (f"Human A/B preference (Fig. 8): win / tie / loss of the intervened clip against the baseline, "
               f"{n['n_pairs']} pairs, {n['n_listeners']} listeners; bars over the win share are 95% bootstrap "
               f"CIs over pairs and listeners.")
    return FigureSpec("ab_preference", fig, caption, {"summary": summary.to_dicts()})


# ---------------------------------------------------------------------------- simulation


def simulate_listeners(key: pl.DataFrame, labels: Mapping[str, str | None], n_listeners: int,
                       noise: float, seed: int) -> dict[str, pl.DataFrame]:
    """Answers of ``n_listeners`` simulated listeners, in the kit's export format.

    A listener "hears" what the embedded judge heard (``labels``: attempt_id -> judge label):
    in a pair the clip judged as the target emotion is preferred (indecisive when both or
    neither are); a label item gets the judge's label. With probability ``noise`` an answer
    is instead drawn uniformly from the task's answers. Trial order and sides are shuffled
    per listener, as the kit does. For the embedded default only: real results are people's.
    """
    if not 0 <= noise <= 1:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    kit_id = key.filter(pl.col("task") == "ab")["set_id"][0]
    out = {}
    for n in range(1, n_listeners + 1):
        name = f"sim{n:02d}"
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5137, n]))
        rows = []
        for task in ("ab", "label"):
            items = list(trial_groups(key.filter(pl.col("task") == task)))
            for trial, idx in enumerate(rng.permutation(len(items)), start=1):
                item, g = items[idx]
                clips = g["clip"].to_list()
                if task == "ab":
                    if rng.random() < 0.5:
                        clips = clips[::-1]
                    heard = [labels.get(a) == g["emotion"][0] for a in g["attempt_id"]]
                    by_clip = dict(zip(g["clip"].to_list(), heard))
                    a_ok, b_ok = by_clip[clips[0]], by_clip[clips[1]]
                    answer = "indecisive" if a_ok == b_ok else ("A" if a_ok else "B")
                    if rng.random() < noise:
                        answer = AB_ANSWERS[rng.integers(len(AB_ANSWERS))]
                    rows.append([kit_id, name, task, trial, item, clips[0], clips[1], answer])
                else:
                    answer = labels.get(g["attempt_id"][0]) or "unclear"
                    if rng.random() < noise:
                        answer = LABEL_ANSWERS[rng.integers(len(LABEL_ANSWERS))]
                    rows.append([kit_id, name, task, trial, item, clips[0], "", answer])
        out[name] = pl.DataFrame(rows, schema=list(ANSWER_COLUMNS), orient="row")
    return out


# ---------------------------------------------------------------------------- report


def report_section(tables_dir, ab_table=None, ab_figure=None, link_base=None) -> str:
    """The report's human-evaluation part: Fig. 8's table and figure, and CAS-H against the
    SER-judged masks (Table 3's *_h row, Table 5's human-vs-SER comparison). Empty when none."""
    import os

    from esn_core.io import read_frame
    from esn_core.report import markdown_table

    tables_dir = Path(tables_dir)
    lines: list[str] = []
    if ab_table:
        summary = read_frame(ab_table)
        lines += ["## Human A/B preference (Fig. 8)", "", markdown_table(summary.select(
            "emotion", "n_pairs", "n_listeners", "win_pct", "win_lo", "win_hi", "tie_pct", "loss_pct"))]
        if ab_figure:
            rel = os.path.relpath(ab_figure, link_base) if link_base is not None else ab_figure
            lines += [f"![ab_preference]({Path(rel).as_posix()})", "",
                      "*Win / tie / loss of the intervened clip, 95% bootstrap CIs over pairs and listeners.*", ""]
    t3, t5 = tables_dir / "table3_selectors.parquet", tables_dir / "table5_masks.parquet"
    if t3.exists():
        table3 = read_frame(t3)
        human_rows = table3.filter(pl.col("selector").str.ends_with("_h"))
        if human_rows.height:
            base = [s[:-2] for s in human_rows["selector"].to_list()]
            lines += ["## Human-labelled success sets (CAS-H, Table 3)", "",
                      markdown_table(table3.filter(pl.col("selector").is_in(base + human_rows["selector"].to_list())))]
            if t5.exists():
                table5 = read_frame(t5).filter(
                    pl.col("selector_b").str.ends_with("_h") & pl.col("selector_a").is_in(base))
                if table5.height:
                    lines += ["## Human vs SER masks (Table 5)", "", markdown_table(table5)]
    return ("\n" + "\n".join(lines).rstrip() + "\n") if lines else ""
