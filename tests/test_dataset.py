import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forge.config import DatasetConfig
from forge.dataset import DatasetError, Source

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
