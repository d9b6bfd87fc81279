"""hf:// URLs and dataset.streaming against FakeHub (the project's Hub test double, spoken to by the
real huggingface_hub client): files read as the stage goes, nothing downloaded first."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import forge_cli, read_rows
from fake_hub import FakeHub
from object_store import remote_rows

pytestmark = pytest.mark.slow
TOKEN = "hf_forgeTestToken0000000000000000000"
DOCS = [f"document number {i} about the river and the sea " * (1 + i % 5) for i in range(300)]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub({TOKEN: "write"}, user="tester") as h:
        api = HfApi(endpoint=h.url, token=TOKEN)
        api.create_repo("tester/docs", repo_type="dataset")
        for part in range(3):
            buf = io.BytesIO()
            rows = DOCS[part * 100 : (part + 1) * 100]
            pq.write_table(pa.table({"id": [f"d{part}-{i}" for i in range(100)], "text": rows}), buf)
            api.upload_file(
                path_or_fileobj=buf.getvalue(),
                path_in_repo=f"data/train-0000{part}-of-00003.parquet",
                repo_id="tester/docs",
                repo_type="dataset",
            )
        yield h


def _env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    return {
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }


def test_tokenize_from_hf_urls_to_the_store(hub: FakeHub, s3, tiny_model: Path, tmp_path: Path) -> None:
    bucket = s3.bucket("tok")
    args = ["pipeline=tokenize", f"tokenize.tokenizer={tiny_model}", "dataset.text_column=text"]
    remote = forge_cli(
        [*args, "dataset.name=hf://datasets/tester/docs/data", f"output.dir=s3://{bucket}/runs/tok"],
        tmp_path,
        env=_env(hub, tmp_path),
    )
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert TOKEN not in remote.stderr + remote.stdout
    fs = s3.fs()
    index = json.loads(fs.cat_file(f"{bucket}/runs/tok/index.json"))
    [source] = index["sources"].values()
    assert source["documents"] == 300
    assert len(remote_rows(fs, f"{bucket}/runs/tok")) == 300
    for path in fs.find(bucket):
        assert TOKEN.encode() not in fs.cat_file(path), path


def test_streaming_a_hub_dataset_downloads_nothing_first(hub: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "cur"
    args = ["pipeline=curate", "dataset.name=tester/docs", "dataset.streaming=true", "dataset.text_column=text"]
    proc = forge_cli([*args, f"output.dir={out}", "output.examples_per_chunk=64"], tmp_path, env=_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out) + read_rows(out, "rejected")
    where = [r["where"] if "where" in r else r["source"]["where"] for r in rows]
    assert len(rows) == 300 and all(w.startswith("hf://datasets/tester/docs") for w in where), where[:3]
    cached = [p for p in (tmp_path / "hf_home").rglob("*.parquet")] if (tmp_path / "hf_home").exists() else []
    assert not cached, cached  # read through HfFileSystem, never a dataset download
    # a missing split is one line, naming it
    bad = forge_cli([*args, "dataset.split=test", f"output.dir={tmp_path / 'bad'}"], tmp_path, env=_env(hub, tmp_path))
    assert bad.returncode == 2 and "dataset.split: 'test' not in tester/docs" in bad.stderr, bad.stderr[-2000:]
