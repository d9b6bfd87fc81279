"""Publishing to the Hub (forge/io/hub.py), against FakeHub: a TEST DOUBLE of the Hub's HTTP API
(tests/fake_hub.py) that the real huggingface_hub client talks to over HTTP, since the Hub cannot
be reached from here. forge itself runs for real: the CLI in a subprocess, the CPU engine, real
Parquet. The double has no Xet storage, so the forge processes get HF_HUB_DISABLE_XET=1 and
huggingface_hub takes its LFS path (with hf_xet installed it would otherwise upload through Xet).
"""

from __future__ import annotations

import io
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, read_rows, write_jsonl
from fake_hub import FakeHub

from forge.io.hub import HubPublisher, HubTarget, can_write

USER = "forge-tester"
WRITE = "hf_" + secrets.token_hex(17)  # token-shaped, so the log filter also knows it by its shape
READ = "hf_" + secrets.token_hex(17)


@pytest.fixture
def hub():
    with FakeHub({WRITE: "write", READ: "read"}, user=USER) as h:
        yield h


def hub_env(hub: FakeHub, home: Path, token: str | None = WRITE) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1")
    if token:
        env["HF_TOKEN"] = token
    return env


def forge_args(data: Path, out: Path, repo: str, *extra: str, max_tokens: int = 24) -> list[str]:
    return [
        sys.executable,
        "-m",
        "forge.cli",
        "run.progress=false",
        f"dataset.name={data}",
        "dataset.id_column=id",
        f"generation.max_tokens={max_tokens}",
        f"output.dir={out}",
        "output.examples_per_chunk=4",
        "run.max_in_flight=4",
        f"output.hub_repo={repo}",
        "output.hub_commits_per_hour=3600",  # one commit a second, so the test is quick
        "output.hub_backoff_s=0.2",
        *extra,
    ]


@pytest.fixture
def make_repo(hub: FakeHub, monkeypatch: pytest.MonkeyPatch):
    """In-process huggingface_hub pointed at the double (no Xet there); returns a repo maker."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", WRITE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)

    def make(name: str) -> str:
        repo = f"{USER}/{name}"
        HfApi(endpoint=hub.url, token=WRITE).create_repo(repo, repo_type="dataset")
        return repo

    return make


def docs(tmp_path: Path, n: int) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i:03d}", "prompt": f"Say {i} in words."} for i in range(n)])


# ---- token checks: before any engine starts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "expected"),
    [(None, "no Hugging Face token found"), (READ, "is read-only"), ("hf_" + "x" * 34, "invalid or expired")],
    ids=["missing", "read-only", "unknown"],
)
def test_a_bad_token_stops_the_run_before_the_engine_starts(
    hub: FakeHub, tmp_path: Path, tiny_model: Path, token: str | None, expected: str
) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        forge_args(docs(tmp_path, 4), out, f"{USER}/synth"),
        cwd=REPO,
        env=hub_env(hub, tmp_path / "hf_home", token),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "output.hub_repo" in proc.stderr
    if token == READ:
        assert "HF_TOKEN" in proc.stderr  # says where the token came from
    assert not list((out / "logs").glob("engine_*.log")), "an engine was started"
    assert f"{USER}/synth" not in hub.repos
    assert not out.exists(), "a refused run wrote into its run dir"
    if token:
        assert token not in proc.stderr + proc.stdout


def test_fine_grained_tokens_need_write_on_the_repo() -> None:
    def me(scoped: list[dict]) -> dict:
        return {"auth": {"accessToken": {"role": "fineGrained", "fineGrained": {"scoped": scoped}}}}

    assert can_write({"auth": {"accessToken": {"role": "write"}}}, "u/x")
    assert not can_write({"auth": {"accessToken": {"role": "read"}}}, "u/x")
    assert can_write(me([{"entity": {"type": "user", "name": "u"}, "permissions": ["repo.write"]}]), "u/x")
    assert not can_write(me([{"entity": {"type": "user", "name": "u"}, "permissions": ["repo.content.read"]}]), "u/x")
    assert not can_write(me([{"entity": {"type": "org", "name": "other"}, "permissions": ["repo.write"]}]), "u/x")
    assert can_write(me([{"entity": {"type": "dataset", "name": "u/x"}, "permissions": ["repo.write"]}]), "u/x")


# ---- the publisher on its own: retries, pacing, reconciling after a kill -------------------------------


def _shard(path: Path, ids: list[str]) -> None:
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids}), path)


def test_publisher_retries_paces_and_never_commits_a_chunk_twice(hub: FakeHub, tmp_path: Path, make_repo) -> None:
    repo = make_repo("unit")
    target = HubTarget(repo, commits_per_hour=7200, backoff_s=0.05)  # 0.5 s apart
    out = tmp_path / "run"
    _shard(out / "data" / "00000_00000.parquet", ["a", "b"])

    hub.inject(429, count=2, endpoint="commit", retry_after=0.1)
    hub.inject(503, count=1, endpoint="commit")
    assert HubPublisher(out, target).sync(card="# card\n") == 1
    assert hub.injected == [("commit", 429), ("commit", 429), ("commit", 503)]
    assert len(hub.commits) == 1 and sorted(hub.commits[0]["added"]) == ["README.md", "data/00000_00000.parquet"]

    # killed after the commit landed but before state/hub.json was written: the restarted
    # publisher finds the chunk in the repo and commits only the new one
    (out / "state" / "hub.json").unlink()
    _shard(out / "data" / "00000_00001.parquet", ["c"])
    assert HubPublisher(out, target).sync() == 1
    assert hub.commits[-1]["added"] == ["data/00000_00001.parquet"]
    assert hub.commits[-1]["time"] - hub.commits[-2]["time"] >= target.spacing_s - 0.05  # paced across restarts
    assert HubPublisher(out, target).sync() == 0  # nothing new: no commit at all
    assert len(hub.commits) == 2

    assert hub.files(repo)["data/00000_00000.parquet"] == (out / "data" / "00000_00000.parquet").read_bytes()


def test_upload_failure_after_the_run_keeps_the_data_and_says_rerun(
    hub: FakeHub, tmp_path: Path, make_repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forge.io.hub import HubError, publish_final

    repo = make_repo("fails")
    out = tmp_path / "run"
    _shard(out / "data" / "00000_00000.parquet", ["a"])
    (out / "config.yaml").write_text("dataset: {}\n")
    hub.inject(500, count=10, endpoint="commit")
    monkeypatch.setattr("forge.run.card.render_card", lambda *a, **k: "# card\n")
    with pytest.raises(HubError, match="re-run the same command"):
        publish_final(out, HubTarget(repo, max_retries=2, backoff_s=0.01, commits_per_hour=3600))
    assert (out / "data" / "00000_00000.parquet").exists()
    assert not hub.commits


# ---- a real run, killed and resumed, with injected 429s --------------------------------------------------


def _wait_for(pred, proc: subprocess.Popen, limit: float = 240) -> bool:
    deadline = time.time() + limit
    while time.time() < deadline:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_upload_killed_and_resumed_lands_every_row_once(hub: FakeHub, tmp_path: Path, tiny_model: Path) -> None:
    seed = int(os.environ.get("FORGE_HUB_KILL_SEED") or random.randrange(10_000))  # a failure's seed replays it
    rng = random.Random(seed)
    n = 120
    data, out, repo = docs(tmp_path, n), tmp_path / "out", f"{USER}/synth"
    home = tmp_path / "hf_home"
    # answers long enough that generation spans several paced commits (at 24 tokens it took ~3 s,
    # so a first kill could come after the last row and leave a resumed run nothing to be killed in)
    args = forge_args(data, out, repo, max_tokens=64)
    hub.inject(429, count=2, endpoint="commit", retry_after=0.3)
    hub.inject(503, count=1, endpoint="preupload")
    outputs: list[str] = []
    progress_cards: list[str] = []
    kills = 0
    for attempt in range(6):
        # one resume runs on the saved login instead of HF_TOKEN
        token = None if attempt == 1 else WRITE
        if token is None:
            home.mkdir(parents=True, exist_ok=True)
            (home / "token").write_text(WRITE)
        env = hub_env(hub, home, token)
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if kills < 3:
            # the first kill 1-2 commits in; a resumed run, whose rows may all be written already,
            # is killed within 0.5 s of its first commit: paced at one a second, its final commit
            # (card and stats) cannot have come yet, so the kill lands while it runs
            target = len(hub.commits) + (rng.randint(1, 2) if kills == 0 else 1)

            def seen_commits(target: int = target) -> bool:
                files = hub.files(repo) if repo in hub.repos else {}
                card = files.get("README.md", b"").decode()
                if "## Progress" in card and card not in progress_cards:
                    progress_cards.append(card)
                return len(hub.commits) >= target

            if _wait_for(seen_commits, proc):
                time.sleep(rng.uniform(0, 1.5 if kills == 0 else 0.5))  # kill at a random moment after that commit
                os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
        outputs.append(stdout + stderr)
        if proc.returncode == 0:
            break
        kills += proc.returncode == -signal.SIGKILL  # a kill counts only if it found forge running
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: forge failed:\n{stderr[-3000:]}"
    assert proc.returncode == 0, f"seed {seed}: never finished"
    assert kills >= 2, f"seed {seed}: the run finished too fast to be killed"

    files = hub.files(repo)
    # every local chunk is on the Hub byte for byte, and nothing else is
    local = {f"{sub}/{p.name}": p.read_bytes() for sub in ("data", "rejected") for p in (out / sub).glob("*.parquet")}
    remote = {k: v for k, v in files.items() if k.endswith(".parquet")}
    assert remote.keys() == local.keys() and all(remote[k] == local[k] for k in local)
    # every input row exactly once across the Hub's files
    ids = Counter(
        i for k, v in remote.items() if k.startswith("data/") for i in pq.read_table(io.BytesIO(v))["id"].to_pylist()
    )
    assert ids == Counter(f"d{i:03d}" for i in range(n)), f"seed {seed}"
    assert len(read_rows(out)) == n
    # no file was ever committed twice
    added = Counter(p for c in hub.commits for p in c["added"] if p.endswith(".parquet"))
    assert max(added.values()) == 1, f"seed {seed}: re-uploaded {[p for p, k in added.items() if k > 1]}"
    # paced: at most one commit a second (output.hub_commits_per_hour=3600), across kills and restarts
    times = [c["time"] for c in hub.commits]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 1.0 - 0.05, f"seed {seed}: commits {gaps}"
    assert len(times) <= 128  # and the Hub's hourly limit (the whole test is well under an hour)
    # the injected faults were met and waited out
    assert ("commit", 429) in hub.injected and ("preupload", 503) in hub.injected
    assert any("retry" in o for o in outputs)
    # the card: a progress section while running, the final card (statistics, Hub loading) at the end
    assert progress_cards, "no progress card was seen on the Hub during the run"
    card = files["README.md"].decode()
    assert "## Statistics" in card and f'load_dataset("{repo}"' in card and "## Progress" not in card
    assert "stats.json" in files and "config.yaml" in files
    assert hub.repos[repo]["private"] is True
    # the token is nowhere: run dir, Hub files, terminal output
    for path in out.rglob("*"):
        if path.is_file():
            assert WRITE.encode() not in path.read_bytes(), f"token in {path}"
    assert all(WRITE.encode() not in v for v in files.values())
    assert all(WRITE not in o for o in outputs)
    print(f"seed={seed} kills={kills} commits={len(hub.commits)} injected={hub.injected}")


def test_a_curate_run_publishes_its_data_pools_and_card(hub: FakeHub, tmp_path: Path) -> None:
    """Hub publishing is the runner's, so a batch stage gets it too: data, rejected, every pool
    folder, stats.json and its own card (with a config per pool)."""
    repo = f"{USER}/curated"
    out = tmp_path / "cur"
    args = [
        sys.executable,
        "-m",
        "forge.cli",
        "run.progress=false",
        "pipeline=curate",
        "dataset=mix_tiny",
        "dataset.target_rows=80",
        f"output.dir={out}",
        "output.examples_per_chunk=20",
        f"output.hub_repo={repo}",
        "output.hub_commits_per_hour=3600",
        "+curate.pools.tools=has_tool_calls",
    ]
    proc = subprocess.run(
        args, cwd=REPO, env=hub_env(hub, tmp_path / "hf_home"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = hub.files(repo)
    local = {str(p.relative_to(out)) for p in out.rglob("*.parquet") if not p.name.startswith(".")}
    assert local and local <= set(files)
    assert any(name.startswith("pools/tools/") for name in files)
    card = files["README.md"].decode()
    assert "forge curate" in card and "pool_tools" in card and "stats.json" in files
