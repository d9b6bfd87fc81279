import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forge.config import DatasetConfig
from forge.io.dataset import DatasetError, Source

ROWS = [{"id": f"r{i}", "prompt": f"question {i}", "extra": i} for i in range(10)]


def _rows(cfg: DatasetConfig, task: int = 0, tasks: int = 1):
    return list(Source(cfg).rows(task, tasks))


def test_bundled_sample() -> None:
    rows = _rows(DatasetConfig())
    assert len(rows) == 48 and all(r.record and r.error is None for r in rows)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "arrow", "json", "disk", "glob"])
def test_local_formats(tmp_path, fmt: str) -> None:
    table = pa.Table.from_pylist(ROWS)
    if fmt == "parquet":
        name = tmp_path / "d.parquet"
        pq.write_table(table, name)
    elif fmt == "jsonl":
        name = tmp_path / "d.jsonl"
        name.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        name = tmp_path / "d.json"
        name.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        name = tmp_path / "d.csv"
        name.write_text("id,prompt,extra\n" + "".join(f"{r['id']},{r['prompt']},{r['extra']}\n" for r in ROWS))
    elif fmt == "arrow":
        name = tmp_path / "d.arrow"
        with pa.ipc.new_file(name, table.schema) as w:
            w.write_table(table)
    elif fmt == "disk":
        import datasets

        name = tmp_path / "saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(name))
    else:
        for i in range(2):
            pq.write_table(pa.Table.from_pylist(ROWS[i * 5 : i * 5 + 5]), tmp_path / f"part-{i}.parquet")
        name = tmp_path / "part-*.parquet"
    rows = _rows(DatasetConfig(name=str(name), id_column="id"))
    assert [r.record["prompt"] for r in rows] == [r["prompt"] for r in ROWS]


def test_sharding_is_disjoint_and_complete(tmp_path) -> None:
    name = tmp_path / "d.jsonl"
    name.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = DatasetConfig(name=str(name), max_examples=9)
    shards = [[r.index for r in _rows(cfg, t, 3)] for t in range(3)]
    assert sorted(sum(shards, [])) == list(range(9))
    assert shards[1] == [1, 4, 7]


def test_bad_jsonl_lines_become_error_rows(tmp_path) -> None:
    name = tmp_path / "d.jsonl"
    name.write_bytes(b'{"prompt": "ok"}\n{not json\n\n[1, 2]\n{"prompt": "\xff\xfe"}\n' + b'{"prompt": "end"}\n')
    rows = _rows(DatasetConfig(name=str(name)))
    assert [r.error is None for r in rows] == [True, False, False, False, True]
    assert rows[1].where.endswith("d.jsonl:2") and "not valid JSON" in rows[1].error
    assert "JSON list" in rows[2].error and rows[2].where.endswith("d.jsonl:4")
    assert "not UTF-8" in rows[3].error


def test_missing_column_is_a_clear_error(tmp_path) -> None:
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match=r"no column 'question'.*columns are: id, prompt, extra"):
        _rows(DatasetConfig(name=str(tmp_path / "d.parquet"), prompt_column="question"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"no row has the key 'prompt'.*keys seen: text"):
        _rows(DatasetConfig(name=str(tmp_path / "d.jsonl")))


def test_missing_paths_are_clear(tmp_path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        Source(DatasetConfig(name=str(tmp_path / "nope.parquet")))
    with pytest.raises(DatasetError, match="matches no data files"):
        Source(DatasetConfig(name=str(tmp_path / "*.parquet")))


def test_bom_and_corrupt_files(tmp_path) -> None:
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\n{"prompt": "second"}\n')
    rows = _rows(DatasetConfig(name=str(tmp_path / "bom.jsonl")))
    assert [r.record["prompt"] for r in rows] == ["first", "second"]
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt\nhello\n")
    assert _rows(DatasetConfig(name=str(tmp_path / "bom.csv")))[0].record == {"prompt": "hello"}
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match=r"bad.parquet: cannot read"):
        _rows(DatasetConfig(name=str(tmp_path / "bad.parquet")))


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_lines_with_the_wrong_field_count_become_error_rows(tmp_path, suffix: str, sep: str) -> None:
    name = tmp_path / f"d{suffix}"
    lines = [["id", "prompt"], ["1", "hello 1"], ["20", "hello 20", "EXTRA", "MORE"], ["21"], [], ["22", "ok"]]
    name.write_text("".join(sep.join(f) + "\n" for f in lines) + '23,"a, quoted\nfield"\n'.replace(",", sep, 1))
    rows = _rows(DatasetConfig(name=str(name), id_column="id"))
    assert [(r.record, r.where.rsplit(":", 1)[1], r.error) for r in rows] == [
        ({"id": "1", "prompt": "hello 1"}, "line 2", None),
        (None, "line 3", "line has 4 fields; the header has 2"),
        (None, "line 4", "line has 1 field; the header has 2"),
        ({"id": "22", "prompt": "ok"}, "line 6", None),
        ({"id": "23", "prompt": "a, quoted\nfield"}, "line 8", None),
    ]
    assert rows[1].where == f"{name}:line 3"


def test_csv_with_a_long_field(tmp_path) -> None:
    name = tmp_path / "d.csv"
    name.write_text("prompt\n" + "x" * 300_000 + "\nshort\n")  # over csv's default 128 KiB field limit
    assert [len(r.record["prompt"]) for r in _rows(DatasetConfig(name=str(name)))] == [300_000, 5]


def _gz_lines(n: int) -> bytes:
    return gzip.compress(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"question {i} " * 8}) + "\n" for i in range(n)).encode()
    )


def test_truncated_jsonl_gz_is_read_up_to_the_break(tmp_path) -> None:
    blob = _gz_lines(3000)
    (tmp_path / "a.jsonl.gz").write_bytes(blob[: int(len(blob) * 0.6)])
    (tmp_path / "b.jsonl.gz").write_bytes(_gz_lines(2))
    rows = _rows(DatasetConfig(name=str(tmp_path / "*.jsonl.gz"), id_column="id"))
    good = [r for r in rows if r.where.startswith(str(tmp_path / "a"))]
    broken = good.pop()
    assert 100 < len(good) < 3000 and all(r.error is None for r in good)
    assert [r.record["id"] for r in good] == [f"r{i}" for i in range(len(good))]  # every line whole, in order
    assert broken.record is None and broken.where == f"{tmp_path / 'a.jsonl.gz'}:{len(good) + 1}"
    assert broken.error.startswith("file is truncated or corrupt from this line on (EOFError: ")
    assert broken.error.endswith("); the rest of the file could not be read")
    # the next file of the dataset is still read
    assert [(r.record["id"], r.where) for r in rows[len(good) + 1 :]] == [
        ("r0", f"{tmp_path / 'b.jsonl.gz'}:1"),
        ("r1", f"{tmp_path / 'b.jsonl.gz'}:2"),
    ]


def test_gzip_cut_inside_its_first_line_or_with_a_bad_crc(tmp_path) -> None:
    blob = gzip.compress(json.dumps({"prompt": "word " * 50_000}).encode() + b"\n")
    (tmp_path / "a.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    rows = _rows(DatasetConfig(name=str(tmp_path / "a.jsonl.gz")))
    assert [(r.record, r.where.rsplit(":", 1)[1]) for r in rows] == [(None, "1")]
    blob = bytearray(_gz_lines(5))
    blob[-8] ^= 0xFF  # the CRC in the trailer
    (tmp_path / "a.jsonl.gz").write_bytes(bytes(blob))
    rows = _rows(DatasetConfig(name=str(tmp_path / "a.jsonl.gz")))
    assert [r.error is None for r in rows] == [True] * 5 + [False]
    assert rows[-1].where.endswith("a.jsonl.gz:6") and "(BadGzipFile: CRC check failed" in rows[-1].error


def test_gzip_without_a_final_newline(tmp_path) -> None:
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "a"}\n{"prompt": "b"}'))
    assert [r.record for r in _rows(DatasetConfig(name=str(tmp_path / "a.jsonl.gz")))] == [
        {"prompt": "a"},
        {"prompt": "b"},
    ]


def test_unreadable_gzip_and_truncated_json_array_name_the_file(tmp_path) -> None:
    (tmp_path / "a.jsonl.gz").write_bytes(b"this is not gzip at all\n")
    with pytest.raises(DatasetError, match=r"^\S*a.jsonl.gz: cannot read: Not a gzipped file"):
        _rows(DatasetConfig(name=str(tmp_path / "a.jsonl.gz")))
    (tmp_path / "a.jsonl.gz").write_bytes(_gz_lines(10)[:6])  # cut inside the gzip header
    with pytest.raises(DatasetError, match=r"^\S*a.jsonl.gz: cannot read"):
        _rows(DatasetConfig(name=str(tmp_path / "a.jsonl.gz")))
    blob = gzip.compress(json.dumps(ROWS * 100).encode())
    (tmp_path / "a.json.gz").write_bytes(blob[: len(blob) * 6 // 10])
    with pytest.raises(DatasetError) as info:
        _rows(DatasetConfig(name=str(tmp_path / "a.json.gz")))
    assert str(info.value).startswith(f"{tmp_path / 'a.json.gz'}: the file is truncated or corrupt (EOFError: ")
    assert "\n" not in str(info.value)


def test_jsonl_cut_mid_object_quarantines_the_last_line(tmp_path) -> None:
    text = "".join(json.dumps(r) + "\n" for r in ROWS)
    (tmp_path / "d.jsonl").write_text(text[: len(text) - 20])
    rows = _rows(DatasetConfig(name=str(tmp_path / "d.jsonl")))
    assert [r.error is None for r in rows] == [True] * 9 + [False]
    assert rows[-1].where.endswith("d.jsonl:10") and "line is not valid JSON" in rows[-1].error


def test_a_resume_skips_done_rows_by_parquet_footers_and_yields_the_same_rest(tmp_path) -> None:
    """rows(skip=) and Mix.rows(done=) give exactly the rows a read-through would, for every
    task of a sharded run, across files and row groups."""
    from forge.io.mix import open_mix

    for part in range(3):
        rows = [{"id": f"{part}-{i}", "text": f"row {part} {i}"} for i in range(50)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"p{part}.parquet", row_group_size=7)
    cfg = DatasetConfig(name=str(tmp_path / "*.parquet"), text_column="text")
    src = Source(cfg, all_columns=True)
    every = [(r.index, r.record["id"], r.where) for r in src.rows()]
    assert len(every) == 150
    for skip in (0, 6, 7, 49, 50, 51, 120, 150, 400):
        assert [(r.index, r.record["id"], r.where) for r in src.rows(skip=skip)] == every[skip:]
    mix = open_mix(cfg)
    for tasks in (1, 3):
        for task in range(tasks):
            whole = [(m.index, m.row.record["id"]) for m in mix.rows(task, tasks)]
            for done in (0, 5, 17, len(whole)):
                assert [(m.index, m.row.record["id"]) for m in mix.rows(task, tasks, done=done)] == whole[done:]
