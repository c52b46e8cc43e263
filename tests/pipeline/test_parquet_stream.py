"""ParquetStream: pieces written in any batching give the bytes of pyarrow's one-shot writer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import SCHEMA_VERSION_KEY, ParquetFormat, ParquetStream, write_parquet

FMT = ParquetFormat(row_group_rows=100, use_dictionary=False, compression_level=1,
                    uncompressed=("scores",), statistics=("id",))


def table(n: int) -> pa.Table:
    rng = np.random.default_rng(n)
    lengths = rng.integers(0, 6, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table({
        "id": pa.array(np.arange(n, dtype=np.int64)),
        "scores": pa.ListArray.from_arrays(pa.array(offsets),
                                           pa.array(rng.random(offsets[-1], np.float32))),
    })


def one_shot(t: pa.Table, path, version="7") -> bytes:
    """pyarrow's own writer with the options ParquetFormat claims to stand for."""
    schema = t.schema.with_metadata({SCHEMA_VERSION_KEY: version.encode()})
    pq.write_table(t.replace_schema_metadata(schema.metadata), path, row_group_size=100,
                   compression={"id": "zstd", "scores": "none"}, compression_level={"id": 1},
                   use_dictionary=False, write_statistics=["id"])
    return path.read_bytes()


@pytest.mark.parametrize("pieces", [[350], [1, 99, 100, 150], [37] * 9 + [17], [0, 350, 0]])
@pytest.mark.parametrize("background", [False, True])
def test_pieces_give_the_one_shot_bytes(tmp_path, pieces, background):
    whole = table(sum(pieces))
    out = tmp_path / "stream.parquet"
    with ParquetStream(out, whole.schema, "7", FMT, background=background) as stream:
        start = 0
        for n in pieces:
            stream.write(whole.slice(start, n))
            start += n
    assert out.read_bytes() == one_shot(whole, tmp_path / "oracle.parquet")
    meta = pq.ParquetFile(out).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [100, 100, 100, 50]
    assert pq.read_table(out).equals(whole.replace_schema_metadata(
        pq.read_table(out).schema.metadata))
    assert list(tmp_path.glob(".*tmp")) == []


def test_write_parquet_is_the_one_shot_writer(tmp_path):
    t = table(250)
    write_parquet(t, tmp_path / "a.parquet", "7", FMT)
    assert (tmp_path / "a.parquet").read_bytes() == one_shot(t, tmp_path / "b.parquet")


def test_error_inside_leaves_nothing(tmp_path):
    t = table(300)
    out = tmp_path / "x.parquet"
    with pytest.raises(RuntimeError, match="boom"), \
            ParquetStream(out, t.schema, "1", FMT, background=True) as stream:
        stream.write(t)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_piece_with_another_schema_is_refused(tmp_path):
    t = table(10)
    with pytest.raises(ValueError, match="schema"), \
            ParquetStream(tmp_path / "x.parquet", t.schema, "1", FMT) as stream:
        stream.write(t.rename_columns(["id", "other"]))
    assert list(tmp_path.iterdir()) == []


def test_empty_stream_writes_an_empty_table(tmp_path):
    t = table(5)
    with ParquetStream(tmp_path / "x.parquet", t.schema, "1", FMT):
        pass
    got = pq.read_table(tmp_path / "x.parquet")
    assert got.num_rows == 0 and got.schema.names == ["id", "scores"]
