"""Parquet I/O: declared schemas, provenance metadata, atomic writes, checked reads.

Every table the pipeline writes has a name in ``SCHEMAS``. ``write_table`` checks the
data against the declared columns, stamps provenance into the file metadata and writes
through a temp file + ``os.replace`` so that an interrupted job never leaves a file at the
final path. ``read_table`` refuses a file that is not Parquet, is truncated, or lacks a
declared column / has it with another type, and says which file and which column.

Per-attempt count vectors are the one column whose type is data-dependent (the list
width is the group's N, the value type is the narrowest unsigned int that holds the
largest count); they are declared as ``COUNT_VECTOR`` and checked structurally.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from esn_core import __version__

PROVENANCE_KEY = b"esn.provenance"

# Marker type for "fixed-size list of an unsigned integer type" columns.
COUNT_VECTOR = "count_vector"
# Marker type for "fixed-size list of float32" columns (optional moments).
FLOAT_VECTOR = "float_vector"

SCHEMAS: dict[str, dict[str, Any]] = {
    # corpus: one row per ESD wav (SPEC §8)
    "manifest": {
        "utterance_id": pa.string(),
        "speaker": pa.string(),
        "emotion": pa.string(),
        "index": pa.int32(),
        "transcript": pa.string(),
        "reference_text": pa.string(),
        "path": pa.string(),
        "duration_s": pa.float64(),
        "sample_rate": pa.int32(),
        "split": pa.string(),
    },
    # one row per generation attempt (sampling and evaluation alike)
    "attempts": {
        "attempt_id": pa.string(),
        "source_id": pa.string(),
        "speaker": pa.string(),
        "split": pa.string(),
        "target_emotion": pa.string(),
        "condition": pa.string(),
        "mask_emotion": pa.string(),
        "intervention": pa.string(),
        "alpha": pa.float64(),
        "reference_text": pa.string(),
        "decoded_text": pa.string(),
        "audio_path": pa.string(),
        "n_positions": pa.int64(),
        "seed": pa.int64(),
    },
    # per-attempt activation counts (SPEC §2)
    "counts": {
        "attempt_id": pa.string(),
        "T": pa.int64(),
        "K": COUNT_VECTOR,
    },
    "counts_moments": {
        "attempt_id": pa.string(),
        "T": pa.int64(),
        "K": COUNT_VECTOR,
        "sum_a": FLOAT_VECTOR,
        "sum_a2": FLOAT_VECTOR,
    },
    # one judge's verdict on one attempt's audio
    "judgements": {
        "attempt_id": pa.string(),
        "judge": pa.string(),
        "label": pa.string(),
        "raw_label": pa.string(),
        "score": pa.float64(),
        "wer": pa.float64(),
        "ref_words": pa.int64(),
        "word_errors": pa.int64(),
        "mos": pa.float64(),
        "mos_estimator": pa.string(),
    },
    # success filter audit trail (SPEC §3): every attempt, with why it is in or out
    "success": {
        "attempt_id": pa.string(),
        "emotion": pa.string(),
        "label": pa.string(),
        "wer": pa.float64(),
        "emotion_ok": pa.bool_(),
        "content_ok": pa.bool_(),
        "success": pa.bool_(),
        "kept": pa.bool_(),
    },
    # activation probabilities (SPEC §4), long format
    "probs": {
        "emotion": pa.string(),
        "layer": pa.int32(),
        "neuron": pa.int32(),
        "k": pa.int64(),
        "t": pa.int64(),
        "p": pa.float64(),
    },
    # human evaluation (SPEC §7): the kit's key (which clip is which attempt), kept out of the kit
    "kit_key": {
        "task": pa.string(),
        "item": pa.string(),
        "clip": pa.string(),
        "role": pa.string(),
        "attempt_id": pa.string(),
        "emotion": pa.string(),
        "audio_path": pa.string(),
        "set_id": pa.string(),
    },
    # imported human labels of identification attempts: the majority answer per attempt (CAS-H)
    "human_labels": {
        "attempt_id": pa.string(),
        "label": pa.string(),
        "n_answers": pa.int64(),
        "n_majority": pa.int64(),
    },
    # imported A/B answers, one per (listener, pair): outcome of the intervened clip
    "ab_answers": {
        "listener": pa.string(),
        "pair_id": pa.string(),
        "emotion": pa.string(),
        "outcome": pa.string(),
        "file": pa.string(),
        "row": pa.int64(),
    },
    # a selector's masks (SPEC §5)
    "masks": {
        "emotion": pa.string(),
        "layer": pa.int32(),
        "neuron": pa.int32(),
        "score": pa.float64(),
        "rank": pa.int32(),
    },
}


class TableError(ValueError):
    """A Parquet file that does not match what the pipeline expects."""


def config_digest(config: Mapping[str, Any]) -> str:
    """Stable short digest of a (JSON-serialisable) config mapping."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _is_unsigned_list(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and pa.types.is_unsigned_integer(t.value_type)


def _is_float_list(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)


def _check_columns(schema: pa.Schema, name: str, where: str) -> None:
    declared = SCHEMAS[name]
    for col, want in declared.items():
        if col not in schema.names:
            raise TableError(f"{where}: missing column {col!r} of table {name!r}")
        got = schema.field(col).type
        if want == COUNT_VECTOR:
            ok = _is_unsigned_list(got)
            want_s = "fixed_size_list<unsigned int>"
        elif want == FLOAT_VECTOR:
            ok = _is_float_list(got)
            want_s = "fixed_size_list<float>"
        else:
            ok = got == want
            want_s = str(want)
        if not ok:
            raise TableError(
                f"{where}: column {col!r} of table {name!r} has type {got}, expected {want_s}"
            )


def conform(table: pa.Table, name: str) -> pa.Table:
    """Cast a table's declared columns to the declared types (extra columns kept)."""
    if name not in SCHEMAS:
        raise KeyError(f"unknown table {name!r}; known: {sorted(SCHEMAS)}")
    cols = []
    for field in table.schema:
        want = SCHEMAS[name].get(field.name)
        col = table.column(field.name)
        if isinstance(want, pa.DataType) and field.type != want:
            try:
                col = col.cast(want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise TableError(
                    f"table {name!r}: column {field.name!r} ({field.type}) cannot be cast "
                    f"to {want}: {exc}"
                ) from exc
        cols.append(col)
    return pa.Table.from_arrays(cols, names=table.schema.names, metadata=table.schema.metadata)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only on success.

    The file gets the mode ``open()`` gives a new file under the process umask (not
    mkstemp's private 0600), as long as the caller writes into it rather than replacing it.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    # mkstemp creates the file 0600; give it the mode a plain open() would, so collaborators
    # on a shared filesystem can read results as their umask allows.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_table(
    table: pa.Table,
    path: str | os.PathLike,
    name: str,
    provenance: Mapping[str, Any] | None = None,
    row_group_size: int | None = None,
) -> Path:
    """Validate ``table`` as table ``name`` and write it atomically with provenance."""
    table = conform(table, name)
    _check_columns(table.schema, name, f"table {name!r} to be written to {path}")
    meta = dict(table.schema.metadata or {})
    prov = {"table": name, "esn_core_version": __version__, **(provenance or {})}
    meta[PROVENANCE_KEY] = json.dumps(prov, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
    return Path(path)


def read_schema(path: str | os.PathLike) -> pa.Schema:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TableError(f"{path}: not a readable Parquet file (truncated or corrupt?): {exc}") from exc


def read_table(path: str | os.PathLike, name: str | None, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file, refusing it unless it has table ``name``'s declared columns.

    ``name=None`` reads a table without declared columns (the evaluation tables); a file
    that is not Parquet is still refused with its path named.
    """
    path = Path(path)
    schema = read_schema(path)
    if name is not None:
        _check_columns(schema, name, str(path))
    elif columns:
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise TableError(f"{path}: missing column(s) {missing}")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TableError(f"{path}: not a readable Parquet file (truncated or corrupt?): {exc}") from exc


def read_frame(path: str | os.PathLike, name: str | None = None, columns: list[str] | None = None) -> pl.DataFrame:
    """``read_table`` as a polars DataFrame: the one Parquet reader of the pipeline."""
    return pl.from_arrow(read_table(path, name, columns))


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    meta = read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    if raw is None:
        raise TableError(f"{path}: no esn provenance in the file metadata")
    return json.loads(raw)
