"""The fake Hub (tests/fake_hub.py) is faithful enough: the real huggingface_hub client, over real HTTP, gets the
answers it gets from the Hub. Additions are io.BytesIO objects: with hf_xet installed that is what makes
huggingface_hub 2.4.0 take the LFS path (bytes and paths go through Xet, which the double refuses)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from fake_hub import FakeHub
from huggingface_hub import CommitOperationAdd, HfApi, RepoFile, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

REPO = "forge-tester/ds"
README = b"---\nlicense: mit\n---\n# A dataset\n"
A = b"PAR1" + bytes(range(256)) * 40 + b"PAR1"
B = b"PAR1" + b"\x00\x01 not really parquet" * 300 + b"PAR1"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest may have set it
    with FakeHub(tokens={"w-token": "write", "r-token": "read"}) as hub:
        yield hub


def api(hub: FakeHub, token: str = "w-token") -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def endpoints(hub: FakeHub, since: int = 0) -> list[str]:
    return [r["endpoint"] for r in hub.requests[since:]]


def commit(hub: FakeHub, files: dict[str, bytes], token: str = "w-token", message: str = "upload", **kwargs):
    ops = [CommitOperationAdd(path, io.BytesIO(data)) for path, data in files.items()]
    return api(hub, token).create_commit(REPO, operations=ops, repo_type="dataset", commit_message=message, **kwargs)


def test_whoami_roles(hub: FakeHub) -> None:
    me = api(hub).whoami()
    assert me["name"] == "forge-tester" and me["type"] == "user"
    assert me["auth"]["type"] == "access_token"
    assert me["auth"]["accessToken"]["role"] == "write"
    assert api(hub, "r-token").whoami()["auth"]["accessToken"]["role"] == "read"
    assert all("Authorization" not in str(r) and "w-token" not in str(r) for r in hub.requests)


def test_unknown_token_is_401(hub: FakeHub) -> None:
    with pytest.raises(HfHubHTTPError) as err:
        api(hub, "nope").whoami()
    assert err.value.response.status_code == 401
    api(hub).create_repo(REPO, repo_type="dataset")
    with pytest.raises(HfHubHTTPError) as err:
        api(hub, "nope").list_repo_files(REPO, repo_type="dataset")
    assert err.value.response.status_code == 401


def test_create_repo_private_flag_and_exist_ok(hub: FakeHub) -> None:
    url = api(hub).create_repo(REPO, repo_type="dataset", private=True)
    assert url.repo_id == REPO and url.repo_type == "dataset"
    api(hub).create_repo("forge-tester/public", repo_type="dataset", private=False)
    assert hub.repos == {
        REPO: {"private": True, "type": "dataset"},
        "forge-tester/public": {"private": False, "type": "dataset"},
    }
    assert api(hub).dataset_info(REPO).private is True

    with pytest.raises(HfHubHTTPError) as err:
        api(hub).create_repo(REPO, repo_type="dataset")
    assert err.value.response.status_code == 409
    assert api(hub).create_repo(REPO, repo_type="dataset", exist_ok=True).repo_id == REPO
    assert hub.repos[REPO]["private"] is True  # exist_ok does not change the existing repo

    with pytest.raises(HfHubHTTPError) as err:
        api(hub, "r-token").create_repo("forge-tester/other", repo_type="dataset")
    assert err.value.response.status_code == 403
    with pytest.raises(RepositoryNotFoundError):  # anonymous: a private repo does not exist
        HfApi(endpoint=hub.url, token=False).dataset_info(REPO)
    assert HfApi(endpoint=hub.url, token=False).dataset_info("forge-tester/public").private is False


def test_commit_takes_lfs_path_and_tree_reports_it(hub: FakeHub, tmp_path: Path) -> None:
    api(hub).create_repo(REPO, repo_type="dataset", private=True)
    start = len(hub.requests)
    info = commit(hub, {"README.md": README, "data/a.parquet": A, "data/b.parquet": B}, message="add data")

    seen = endpoints(hub, start)
    assert seen.count("preupload") == 1 and seen.count("lfs_batch") == 1
    assert seen.count("lfs_upload") == 2 and seen[-1] == "commit"
    assert "xet_token" not in seen
    assert info.oid == hub.commits[-1]["oid"] and info.commit_url.endswith(f"/datasets/{REPO}/commit/{info.oid}")

    tree = {e.path: e for e in api(hub).list_repo_tree(REPO, repo_type="dataset", recursive=True)}
    assert set(tree) == {".gitattributes", "README.md", "data", "data/a.parquet", "data/b.parquet"}
    for path, data in [("data/a.parquet", A), ("data/b.parquet", B)]:
        entry = tree[path]
        assert isinstance(entry, RepoFile) and entry.size == len(data)
        assert entry.lfs is not None and entry.lfs.sha256 == hashlib.sha256(data).hexdigest()
        assert entry.lfs.size == len(data)
    readme = tree["README.md"]
    assert isinstance(readme, RepoFile) and readme.lfs is None and readme.size == len(README)
    assert readme.blob_id == hashlib.sha1(b"blob %d\0" % len(README) + README).hexdigest()
    assert sorted(api(hub).list_repo_files(REPO, repo_type="dataset")) == sorted(set(tree) - {"data"})

    files = hub.files(REPO)
    assert files["README.md"] == README and files["data/a.parquet"] == A and files["data/b.parquet"] == B
    assert len(hub.commits) == 1
    assert hub.commits[0]["repo"] == REPO and hub.commits[0]["message"] == "add data"
    assert sorted(hub.commits[0]["added"]) == ["README.md", "data/a.parquet", "data/b.parquet"]
    assert hub.commits[0]["deleted"] == []

    history = api(hub).list_repo_commits(REPO, repo_type="dataset")
    assert [c.title for c in history] == ["add data", "initial commit"] and history[0].commit_id == info.oid
    path = hf_hub_download(
        REPO, "data/b.parquet", repo_type="dataset", endpoint=hub.url, token="w-token", cache_dir=tmp_path
    )
    assert Path(path).read_bytes() == B


def test_identical_lfs_content_is_not_uploaded_again(hub: FakeHub) -> None:
    api(hub).create_repo(REPO, repo_type="dataset")
    commit(hub, {"data/a.parquet": A})
    start = len(hub.requests)
    commit(hub, {"data/copy.parquet": A}, message="same bytes, new path")
    seen = endpoints(hub, start)
    assert "lfs_batch" in seen and "lfs_upload" not in seen and seen[-1] == "commit"
    assert hub.files(REPO)["data/copy.parquet"] == A

    start = len(hub.requests)  # same path, same bytes: huggingface_hub drops the no-op and makes no commit
    commit(hub, {"data/a.parquet": A}, message="nothing new")
    assert "commit" not in endpoints(hub, start) and "lfs_upload" not in endpoints(hub, start)
    assert [c["message"] for c in hub.commits] == ["upload", "same bytes, new path"]


def test_read_token_cannot_commit(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    api(hub).create_repo(REPO, repo_type="dataset")
    # Like the Hub, a read token's create_repo(exist_ok=True) of an existing repo passes (403, then repo_info finds
    # it). huggingface_hub 2.4.0 then parses the URL against constants.ENDPOINT, not HfApi(endpoint=...): set it
    # the way HF_ENDPOINT would, or it raises HfUriError.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    assert api(hub, "r-token").create_repo(REPO, repo_type="dataset", exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        commit(hub, {"data/a.parquet": A}, token="r-token")
    assert err.value.response.status_code == 403
    assert "you must use a write token" in str(err.value)
    assert hub.commits == [] and "data/a.parquet" not in hub.files(REPO)


def test_injected_429_on_commit_then_success(hub: FakeHub) -> None:
    api(hub).create_repo(REPO, repo_type="dataset")
    hub.inject(429, retry_after=0.1)
    with pytest.raises(HfHubHTTPError) as err:
        commit(hub, {"data/a.parquet": A})
    assert err.value.response.status_code == 429
    assert err.value.response.headers["Retry-After"] == "0.1"
    assert hub.injected == [("commit", 429)] and hub.commits == []
    commit(hub, {"data/a.parquet": A})  # the bytes were uploaded before the 429: only the commit is redone
    assert len(hub.commits) == 1 and hub.files(REPO)["data/a.parquet"] == A
    assert endpoints(hub).count("lfs_upload") == 1


def test_huggingface_hub_retries_preupload_by_itself(hub: FakeHub) -> None:
    """Every call but the commit POST goes through http_backoff: 408/429/5xx are retried (here after 1 s)."""
    api(hub).create_repo(REPO, repo_type="dataset")
    hub.inject(503, endpoint="preupload")
    commit(hub, {"data/a.parquet": A})
    assert hub.injected == [("preupload", 503)] and len(hub.commits) == 1


def test_stale_parent_commit_is_412(hub: FakeHub) -> None:
    api(hub).create_repo(REPO, repo_type="dataset")
    first = commit(hub, {"a.json": b"{}"})
    commit(hub, {"b.json": b"{}"})
    with pytest.raises(HfHubHTTPError) as err:
        commit(hub, {"c.json": b"{}"}, parent_commit=first.oid)
    assert err.value.response.status_code == 412


def test_tree_pagination(hub: FakeHub) -> None:
    api(hub).create_repo(REPO, repo_type="dataset")
    commit(hub, {f"data/{i}.json": b"[%d]" % i for i in range(5)})
    hub.page_size = 2
    start = len(hub.requests)
    assert len(api(hub).list_repo_files(REPO, repo_type="dataset")) == 6
    assert endpoints(hub, start).count("tree") == 4  # 7 entries (with the folder), 2 a page


@pytest.mark.skipif(
    importlib.util.find_spec("hf_xet") is None or huggingface_hub.constants.HF_HUB_DISABLE_XET,
    reason="needs hf_xet, not disabled",
)
def test_bytes_go_through_xet_which_the_double_refuses(hub: FakeHub) -> None:
    """huggingface_hub 2.4.0 picks Xet on the client side for bytes and paths: the double cannot make it use LFS."""
    api(hub).create_repo(REPO, repo_type="dataset")
    ops = [CommitOperationAdd("data/a.parquet", A)]
    with pytest.raises(Exception, match="501"):
        api(hub).create_commit(REPO, operations=ops, repo_type="dataset", commit_message="xet")
    assert ("xet_token", 501) in [(r["endpoint"], r["status"]) for r in hub.requests]
    assert hub.commits == []


def test_standalone_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    script = Path(__file__).resolve().parents[1] / "fake_hub.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--token", "tok=write", "--state", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        assert url.startswith("http://127.0.0.1:")
        client = HfApi(endpoint=url, token="tok")
        assert client.whoami()["auth"]["accessToken"]["role"] == "write"
        client.create_repo(REPO, repo_type="dataset")
        ops = [CommitOperationAdd("data/a.parquet", io.BytesIO(A)), CommitOperationAdd("README.md", io.BytesIO(README))]
        client.create_commit(REPO, operations=ops, repo_type="dataset", commit_message="persisted")
        assert (tmp_path / "state.json").exists()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    restarted = FakeHub(state_dir=str(tmp_path))
    assert restarted.repos == {REPO: {"private": False, "type": "dataset"}}
    assert restarted.files(REPO)["data/a.parquet"] == A and restarted.files(REPO)["README.md"] == README
    assert [c["message"] for c in restarted.commits] == ["persisted"]
