"""Per-attempt activation counts on disk, and their aggregation into ``P^(e)`` (SPEC §2, §4).

Counts are stored one row per attempt, before any filtering, so that a new judge, WER
threshold, cap or human labels re-aggregate without regenerating. ``K`` is a fixed-size
list of the narrowest unsigned integer type that holds the largest count in the file
(uint8 for attempts of fewer than 256 positions), zstd-compressed: about N bytes per
attempt before compression. The layout (layer sizes) rides in the file's provenance, so a
reader can refuse counts from another model or group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from esn_core import io
from esn_core.constants import EMOTIONS
from esn_core.layout import NeuronLayout

# Attempts per Parquet row group: a row is ~N bytes, so this keeps groups at a few MB.
ROW_GROUP_ATTEMPTS = 16


def narrowest_unsigned(max_value: int) -> pa.DataType:
    for arrow_type, limit in ((pa.uint8(), 2**8), (pa.uint16(), 2**16), (pa.uint32(), 2**32)):
        if max_value < limit:
            return arrow_type
    return pa.uint64()


def _fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    rows, width = values.shape
    flat = pa.array(values.reshape(-1).astype(value_type.to_pandas_dtype(), copy=False), value_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def counts_table(
    attempt_ids: Sequence[str],
    K: np.ndarray,
    T: np.ndarray,
    sum_a: np.ndarray | None = None,
    sum_a2: np.ndarray | None = None,
) -> pa.Table:
    """Arrow table of per-attempt counts (table ``counts`` or ``counts_moments``)."""
    K = np.asarray(K)
    T = np.asarray(T, dtype=np.int64)
    if K.ndim != 2 or K.shape[0] != len(attempt_ids) or T.shape != (len(attempt_ids),):
        raise ValueError(
            f"counts for {len(attempt_ids)} attempts need K [n, N] and T [n]; "
            f"got K {K.shape}, T {T.shape}"
        )
    if K.size and (K.min() < 0 or np.any(K.max(axis=1) > T)):
        bad = int(np.argmax((K.max(axis=1) > T) | (K.min(axis=1) < 0)))
        raise ValueError(f"attempt {attempt_ids[bad]!r}: counts outside 0..T={T[bad]}")
    columns = {
        "attempt_id": pa.array(list(attempt_ids), pa.string()),
        "T": pa.array(T, pa.int64()),
        "K": _fixed_list(K, narrowest_unsigned(int(K.max()) if K.size else 0)),
    }
    if sum_a is not None:
        columns["sum_a"] = _fixed_list(np.asarray(sum_a, np.float32), pa.float32())
        columns["sum_a2"] = _fixed_list(np.asarray(sum_a2, np.float32), pa.float32())
    return pa.table(columns)


def write_counts(
    path: str | os.PathLike,
    attempt_ids: Sequence[str],
    K: np.ndarray,
    T: np.ndarray,
    layout: NeuronLayout,
    provenance: Mapping | None = None,
    sum_a: np.ndarray | None = None,
    sum_a2: np.ndarray | None = None,
) -> None:
    if np.asarray(K).shape[1:] != (layout.n_neurons,):
        raise ValueError(f"K has {np.asarray(K).shape[1:]} neurons, layout has {layout.n_neurons}")
    table = counts_table(attempt_ids, K, T, sum_a, sum_a2)
    name = "counts_moments" if sum_a is not None else "counts"
    prov = {**(provenance or {}), "layer_sizes": layout.to_json()}
    io.write_table(table, path, name, prov, row_group_size=ROW_GROUP_ATTEMPTS)


@dataclass
class Counts:
    attempt_ids: list[str]
    K: np.ndarray  # [n, N] unsigned
    T: np.ndarray  # [n] int64
    layout: NeuronLayout


def read_counts(path: str | os.PathLike, columns: Sequence[str] = ("attempt_id", "T", "K")) -> Counts:
    table = io.read_table(path, "counts", columns=list(columns))
    prov = io.read_provenance(path)
    if "layer_sizes" not in prov:
        raise io.TableError(f"{path}: counts file has no layer_sizes in its provenance")
    layout = NeuronLayout(tuple(prov["layer_sizes"]))
    column = table.column("K").combine_chunks()
    if column.type.list_size != layout.n_neurons:
        raise io.TableError(
            f"{path}: column 'K' holds {column.type.list_size} neurons per attempt but the "
            f"layout has {layout.n_neurons}"
        )
    K = column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), layout.n_neurons)
    return Counts(table.column("attempt_id").to_pylist(), K, table.column("T").to_numpy(), layout)


@dataclass
class EmotionCounts:
    """``K^(e)`` and ``T_e`` of every emotion with a non-empty success set."""

    K: dict[str, np.ndarray]
    T: dict[str, int]
    n_attempts: dict[str, int]
    excluded: list[str]
    layout: NeuronLayout

    def probabilities(self) -> dict[str, np.ndarray]:
        return {e: self.K[e] / self.T[e] for e in self.K}


def aggregate(
    count_paths: Iterable[str | os.PathLike], kept: Mapping[str, Iterable[str]]
) -> EmotionCounts:
    """Sum per-attempt counts over each emotion's success set (SPEC §4).

    ``kept`` maps emotion -> attempt ids in its (capped) success set. Every kept id must
    be found in exactly one counts file; an emotion whose set is empty, or whose attempts
    have no counted positions, is reported in ``excluded`` rather than treated as zeros.
    """
    owner = {}
    for emotion, ids in kept.items():
        for attempt_id in ids:
            if attempt_id in owner:
                raise ValueError(f"attempt {attempt_id!r} is in the success sets of two emotions")
            owner[attempt_id] = emotion
    K: dict[str, np.ndarray] = {}
    T: dict[str, int] = {e: 0 for e in kept}
    n: dict[str, int] = {e: 0 for e in kept}
    layout = None
    found: set[str] = set()
    for path in count_paths:
        counts = read_counts(path)
        if layout is None:
            layout = counts.layout
        elif counts.layout != layout:
            raise ValueError(f"{path}: layout {counts.layout.layer_sizes} differs from earlier files")
        for row, attempt_id in enumerate(counts.attempt_ids):
            emotion = owner.get(attempt_id)
            if emotion is None:
                continue
            if attempt_id in found:
                raise ValueError(f"{path}: attempt {attempt_id!r} appears in two counts files")
            found.add(attempt_id)
            acc = K.setdefault(emotion, np.zeros(layout.n_neurons, dtype=np.int64))
            acc += counts.K[row]
            T[emotion] += int(counts.T[row])
            n[emotion] += 1
    missing = sorted(set(owner) - found)
    if missing:
        raise ValueError(f"{len(missing)} kept attempts have no counts, e.g. {missing[:3]}")
    if layout is None:
        raise ValueError("no counts files given")
    excluded = [e for e in kept if T[e] == 0]
    ordered = [e for e in EMOTIONS if e in K and T[e] > 0]
    return EmotionCounts(
        K={e: K[e] for e in ordered},
        T={e: T[e] for e in ordered},
        n_attempts={e: n[e] for e in ordered},
        excluded=excluded,
        layout=layout,
    )


def probs_table(counts: EmotionCounts) -> pa.Table:
    """Long table (emotion, layer, neuron, k, t, p) for audit and for the selectors."""
    layout = counts.layout
    layer, neuron = layout.unflatten(np.arange(layout.n_neurons))
    parts = []
    for emotion in counts.K:
        k = counts.K[emotion]
        t = counts.T[emotion]
        parts.append(
            pa.table(
                {
                    "emotion": pa.array([emotion] * layout.n_neurons, pa.string()),
                    "layer": pa.array(layer, pa.int32()),
                    "neuron": pa.array(neuron, pa.int32()),
                    "k": pa.array(k, pa.int64()),
                    "t": pa.array(np.full(layout.n_neurons, t), pa.int64()),
                    "p": pa.array(k / t, pa.float64()),
                }
            )
        )
    if not parts:
        raise ValueError("every emotion's success set is empty: nothing to aggregate")
    return pa.concat_tables(parts)


def counts_from_probs_table(table: pa.Table, layout: NeuronLayout) -> dict[str, tuple[np.ndarray, int]]:
    """Inverse of ``probs_table``: {emotion: (K vector, T)} in flat-index order."""
    out = {}
    emotions = table.column("emotion").to_numpy(zero_copy_only=False)
    for emotion in dict.fromkeys(emotions.tolist()):
        rows = emotions == emotion
        flat = layout.flat_index(
            table.column("layer").to_numpy()[rows], table.column("neuron").to_numpy()[rows]
        )
        if len(flat) != layout.n_neurons or len(np.unique(flat)) != layout.n_neurons:
            raise ValueError(f"probs table: emotion {emotion!r} does not cover every neuron once")
        K = np.zeros(layout.n_neurons, dtype=np.int64)
        K[flat] = table.column("k").to_numpy()[rows]
        T = np.unique(table.column("t").to_numpy()[rows])
        if len(T) != 1:
            raise ValueError(f"probs table: emotion {emotion!r} has several T values {T[:3]}")
        out[emotion] = (K, int(T[0]))
    return out
