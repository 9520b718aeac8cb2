"""Parquet I/O (schemas, provenance, atomic writes) and per-attempt count statistics."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esn_core import io, stats
from esn_core.layout import NeuronLayout

LAYOUT = NeuronLayout((3, 2))


def _masks():
    return pa.table(
        {
            "emotion": ["happy", "happy"],
            "layer": pa.array([0, 1], pa.int32()),
            "neuron": pa.array([2, 0], pa.int32()),
            "score": [0.5, 0.25],
            "rank": pa.array([1, 2], pa.int32()),
        }
    )


def test_round_trip_keeps_rows_and_provenance(tmp_path):
    path = tmp_path / "m.parquet"
    io.write_table(_masks(), path, "masks", {"config_digest": "abc", "model": "planted"})
    back = io.read_table(path, "masks")
    assert back.to_pylist() == _masks().to_pylist()
    prov = io.read_provenance(path)
    assert prov["config_digest"] == "abc" and prov["model"] == "planted"
    assert prov["table"] == "masks" and "esn_core_version" in prov


def test_write_casts_compatible_types_and_refuses_missing_columns(tmp_path):
    loose = _masks().set_column(1, "layer", pa.array([0, 1], pa.int64()))
    io.write_table(loose, tmp_path / "ok.parquet", "masks")
    assert io.read_schema(tmp_path / "ok.parquet").field("layer").type == pa.int32()
    with pytest.raises(io.TableError, match="missing column 'rank'"):
        io.write_table(_masks().drop(["rank"]), tmp_path / "bad.parquet", "masks")
    assert not (tmp_path / "bad.parquet").exists()


def test_reader_names_file_and_column_of_a_wrong_schema(tmp_path):
    path = tmp_path / "wrong.parquet"
    pq.write_table(_masks().set_column(3, "score", pa.array(["x", "y"])), path)
    with pytest.raises(io.TableError, match=r"wrong\.parquet.*column 'score'.*string.*double"):
        io.read_table(path, "masks")
    pq.write_table(_masks().drop(["neuron"]), path)
    with pytest.raises(io.TableError, match=r"wrong\.parquet: missing column 'neuron'"):
        io.read_table(path, "masks")


def test_truncated_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "t.parquet"
    io.write_table(_masks(), path, "masks")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.TableError, match=r"t\.parquet: not a readable Parquet file"):
        io.read_table(path, "masks")


def test_interrupted_write_leaves_nothing_at_the_final_path(tmp_path, monkeypatch):
    path = tmp_path / "out.parquet"

    def explode(table, where, **kwargs):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(io.pq, "write_table", explode)
    with pytest.raises(KeyboardInterrupt):
        io.write_table(_masks(), path, "masks")
    assert os.listdir(tmp_path) == []


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "out.parquet"
    io.write_table(_masks(), path, "masks")
    before = path.read_bytes()
    monkeypatch.setattr(io.pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        io.write_table(_masks().slice(0, 1), path, "masks")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.parquet"]


def test_config_digest_is_order_independent():
    assert io.config_digest({"a": 1, "b": [1, 2]}) == io.config_digest({"b": [1, 2], "a": 1})
    assert io.config_digest({"a": 1}) != io.config_digest({"a": 2})


@pytest.mark.parametrize("max_count,arrow_type", [(255, pa.uint8()), (256, pa.uint16()), (70000, pa.uint32())])
def test_counts_use_the_narrowest_unsigned_type(tmp_path, max_count, arrow_type):
    layout = NeuronLayout((2, 1))
    K = np.array([[0, 1, max_count]])
    path = tmp_path / "c.parquet"
    stats.write_counts(path, ["a"], K, [max_count], layout)
    assert io.read_schema(path).field("K").type == pa.list_(arrow_type, 3)
    back = stats.read_counts(path)
    assert back.K.tolist() == K.tolist() and back.T.tolist() == [max_count]
    assert back.layout == layout


def test_counts_outside_zero_to_T_are_refused(tmp_path):
    with pytest.raises(ValueError, match="attempt 'b': counts outside 0..T=2"):
        stats.write_counts(tmp_path / "c.parquet", ["a", "b"], np.array([[1, 0, 0, 0, 0], [3, 0, 0, 0, 0]]), [4, 2], LAYOUT)


def test_counts_of_another_width_are_refused(tmp_path):
    with pytest.raises(ValueError, match="5"):
        stats.write_counts(tmp_path / "c.parquet", ["a"], np.zeros((1, 4), int), [1], LAYOUT)


def test_moments_round_trip(tmp_path):
    path = tmp_path / "m.parquet"
    sum_a = np.arange(5, dtype=np.float32)[None]
    stats.write_counts(path, ["a"], np.ones((1, 5), int), [2], LAYOUT, sum_a=sum_a, sum_a2=sum_a**2)
    table = io.read_table(path, "counts_moments")
    assert table.column("sum_a2").to_pylist() == [[0.0, 1.0, 4.0, 9.0, 16.0]]


def _write_two_files(tmp_path):
    stats.write_counts(tmp_path / "s0.parquet", ["a1", "a2", "a3"],
                       np.array([[1, 2, 3, 0, 0], [4, 0, 0, 1, 1], [9, 9, 9, 9, 9]]), [4, 5, 9], LAYOUT)
    stats.write_counts(tmp_path / "s1.parquet", ["a4", "a5"],
                       np.array([[0, 0, 0, 2, 2], [1, 1, 1, 1, 1]]), [3, 1], LAYOUT)
    return [tmp_path / "s0.parquet", tmp_path / "s1.parquet"]


def test_aggregate_sums_success_sets_by_hand(tmp_path):
    paths = _write_two_files(tmp_path)
    agg = stats.aggregate(paths, {"happy": ["a1", "a4"], "sad": ["a2"], "angry": []})
    assert agg.K["happy"].tolist() == [1, 2, 3, 2, 2]
    assert agg.T == {"happy": 7, "sad": 5}
    assert agg.n_attempts == {"happy": 2, "sad": 1}
    assert agg.excluded == ["angry"]  # reported, never treated as zeros
    np.testing.assert_allclose(agg.probabilities()["sad"], [0.8, 0, 0, 0.2, 0.2])
    # attempts outside every success set (a3, a5) are ignored
    assert list(agg.K) == ["happy", "sad"]


def test_aggregate_refuses_missing_or_shared_attempts(tmp_path):
    paths = _write_two_files(tmp_path)
    with pytest.raises(ValueError, match="have no counts.*zz"):
        stats.aggregate(paths, {"happy": ["a1", "zz"]})
    with pytest.raises(ValueError, match="success sets of two emotions"):
        stats.aggregate(paths, {"happy": ["a1"], "sad": ["a1"]})


def test_probs_table_round_trip(tmp_path):
    agg = stats.aggregate(_write_two_files(tmp_path), {"happy": ["a1", "a4"], "sad": ["a2"]})
    table = stats.probs_table(agg)
    path = tmp_path / "p.parquet"
    io.write_table(table, path, "probs")
    back = stats.counts_from_probs_table(io.read_table(path, "probs"), LAYOUT)
    assert back["happy"][0].tolist() == [1, 2, 3, 2, 2] and back["happy"][1] == 7
    rows = io.read_table(path, "probs").to_pylist()
    assert rows[3] == {"emotion": "happy", "layer": 1, "neuron": 0, "k": 2, "t": 7, "p": 2 / 7}


def test_layout_flat_index_round_trip_with_unequal_layers():
    layout = NeuronLayout((3, 1, 4))
    flat = layout.flat_index([0, 1, 2, 2], [2, 0, 0, 3])
    assert flat.tolist() == [2, 3, 4, 7]
    layer, neuron = layout.unflatten(flat)
    assert layer.tolist() == [0, 1, 2, 2] and neuron.tolist() == [2, 0, 0, 3]
    assert [a.tolist() for a in layout.split_indices([7, 0, 4])] == [[0], [], [0, 3]]
    with pytest.raises(IndexError):
        layout.flat_index([1], [1])
