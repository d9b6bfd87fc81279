"""Faults of the run dir and the config: a damaged cache, a refused command, a typo, an output dir
that cannot be written, a full disk, secrets passed every way the config allows. Each test runs
the real CLI against the real CPU engine and checks the exit code, the one error line, that no row
is lost or duplicated after the re-run, and that no secret reaches any file or stream."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import endpoint_args, forge_cli, read_stats, write_jsonl
from faults.checks import assert_exactly_once, assert_no_secret, error_line, rows_of

pytestmark = pytest.mark.slow
IDS = [f"r{i}" for i in range(60)]


def _input(tmp_path: Path, n: int = 60) -> Path:
    return write_jsonl(tmp_path / "p.jsonl", [{"id": f"r{i}", "prompt": f"story {i}"} for i in range(n)])


def _args(server: dict, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *endpoint_args(server),
        f"dataset.name={data}",
        "dataset.id_column=id",
        "generation.max_tokens=4",
        "output.examples_per_chunk=10",
        f"output.dir={out}",
        *extra,
    ]


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def test_damaged_cache_is_moved_aside_and_only_missing_rows_regenerated(tmp_path: Path, cpu_server: dict) -> None:
    data, out = _input(tmp_path), tmp_path / "out"
    assert forge_cli(_args(cpu_server, data, out), cwd=tmp_path).returncode == 0
    (out / "data" / "00000_00002.parquet").unlink()
    cache = out / "cache" / "task_00000.sqlite"
    with open(cache, "r+b") as fh:
        fh.write(b"\x00garbage" * 13)  # the first 100 bytes: the sqlite header
    proc = forge_cli(_args(cpu_server, data, out), cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is damaged" in proc.stderr and "moved it to" in proc.stderr
    assert list(out.glob("cache/task_00000.sqlite.damaged-*"))
    assert_exactly_once(out, IDS, rejected_ok=False)
    last = read_stats(out)["sessions"][-1]
    assert last["requests_sent"] == 10 and last["cache_hits"] == 0  # only the deleted shard's rows


def test_a_deleted_shard_is_replayed_without_starting_an_engine(tmp_path: Path, cpu_server: dict) -> None:
    data, out = _input(tmp_path), tmp_path / "out"
    assert forge_cli(_args(cpu_server, data, out), cwd=tmp_path).returncode == 0
    (out / "data" / "00000_00001.parquet").unlink()
    proc = forge_cli(_args(cpu_server, data, out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no engine started" in proc.stderr
    last = read_stats(out)["sessions"][-1]
    assert last["requests_sent"] == 0 and last["cache_hits"] == 10 and last["engine_startup_s"] is None
    assert_exactly_once(out, IDS, rejected_ok=False)


def test_a_refused_command_changes_nothing_in_the_run_dir(tmp_path: Path, cpu_server: dict) -> None:
    data, out = _input(tmp_path), tmp_path / "out"
    assert forge_cli(_args(cpu_server, data, out), cwd=tmp_path).returncode == 0
    before = _digests(out)
    proc = forge_cli(_args(cpu_server, data, out, "generation.max_tokens=5", "prompt.system=Other."), cwd=tmp_path)
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert str(out) in line and "max_tokens: 4 -> 5" in line and "output.on_change=fresh" in line
    assert _digests(out) == before, "a refused command rewrote files of the run it was refused by"


def test_a_typo_pins_nothing(tmp_path: Path, cpu_server: dict) -> None:
    data, out = _input(tmp_path, 5), tmp_path / "out"
    proc = forge_cli(_args(cpu_server, data, out, "dataset.prompt_column=nocol"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "'nocol'" in error_line(proc.stderr)
    assert not out.exists(), "a refused command created the run dir"
    # a failure found only once the run was accepted (the context is known from the engine) pins nothing either
    proc = forge_cli(
        _args(cpu_server, data, out, "generation.max_tokens=4000", "model.max_model_len=null"), cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "generation.max_tokens" in error_line(proc.stderr)
    proc = forge_cli(_args(cpu_server, data, out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_exactly_once(out, IDS[:5], rejected_ok=False)


def test_output_dir_that_is_a_file(tmp_path: Path, cpu_server: dict) -> None:
    data = _input(tmp_path, 3)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        proc = forge_cli(_args(cpu_server, data, out), cwd=tmp_path)
        assert proc.returncode == 2
        line = error_line(proc.stderr)
        assert "output.dir" in line and str(blocker) in line and "is a file" in line
    assert blocker.read_text() == "x"


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    )


def test_read_only_output_dir_is_found_before_any_engine_starts(tmp_path: Path, cpu_server: dict) -> None:
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "ro,size=1m"):
        pytest.skip("needs root and mount (a read-only tmpfs)")
    try:
        proc = forge_cli(_args(cpu_server, _input(tmp_path, 3), mnt / "run"), cwd=tmp_path)
        assert proc.returncode == 2
        line = error_line(proc.stderr)
        assert str(mnt) in line and "read-only" in line
        assert "starting" not in proc.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_disk_that_fills_mid_run_loses_nothing(tmp_path: Path, cpu_server: dict) -> None:
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "size=400k"):
        pytest.skip("needs root and mount (a small tmpfs)")
    try:
        ids = [f"r{i}" for i in range(200)]
        data, out = _input(tmp_path, 200), mnt / "run"
        args = [*_args(cpu_server, data, out, "generation.max_tokens=16"), "output.examples_per_chunk=20"]
        proc = forge_cli(args, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr[-3000:]
        line = error_line(proc.stderr)
        assert "No space left on device" in line and str(out) in line and "re-run the same command" in line
        assert "nothing finished was lost" in proc.stderr
        assert not list(out.rglob(".*.tmp-*")), "a failed write left its temp file behind"
        subprocess.run(["mount", "-o", "remount,size=50m", str(mnt)], check=True)
        proc = forge_cli(args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_exactly_once(out, ids, rejected_ok=False)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_secrets_in_every_place_the_config_accepts(tmp_path: Path, cpu_server: dict) -> None:
    """Canaries in engine args (hyphenated as `vllm serve --api-key` spells it), in a header of
    extra_body, under the env var model.api_key_env names and in HF_TOKEN: none in any file of
    the run dir, the card, command.json, forge.log, the engine's log, stdout or stderr."""
    canaries = {
        "args": "CANARYargs7f3a9c",
        "header": "CANARYhdr41b2e8",
        "env": "sk-CANARYenv0123456789",
        "hf": "hf_CANARYhf0123456789abcdefgh",
        "token": "CANARYtok5d6e7f",
    }
    data, out = _input(tmp_path, 6), tmp_path / "out"
    env = {"FORGE_TEST_KEY": canaries["env"], "HF_TOKEN": canaries["hf"]}
    args = _args(
        cpu_server,
        data,
        out,
        f"+model.engine_args.api-key={canaries['args']}",
        f"+model.engine_args.hf_token={canaries['token']}",
        "model.api_key_env=FORGE_TEST_KEY",
        f"+generation.extra_body.metadata={{X-Api-Key: {canaries['header']}}}",
    )
    proc = forge_cli(args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "README.md").exists() and (out / "command.json").exists()
    command = json.loads((out / "command.json").read_text())["overrides"]
    assert "+model.engine_args.api-key=***" in command
    assert_no_secret(out, list(canaries.values()), proc.stdout, proc.stderr)
    # the same canaries on a command refused as a config error, and on the CPU engine that forge
    # starts itself (its command line goes to the engine log; it refuses --api-key and exits)
    bad = forge_cli([*args, "model.tp=0"], cwd=tmp_path, env=env)
    assert bad.returncode == 2
    assert_no_secret(out, list(canaries.values()), bad.stdout, bad.stderr)
    own = tmp_path / "own"
    proc = forge_cli(
        [
            f"dataset.name={data}",
            "dataset.id_column=id",
            "generation.max_tokens=4",
            f"output.dir={own}",
            f"+model.engine_args.api-key={canaries['args']}",
            "model.startup_timeout_s=120",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 1
    assert "engine exited" in error_line(proc.stderr)
    engine_log = (own / "logs" / "engine_task00000.log").read_text()
    assert "--api-key ***" in engine_log
    assert_no_secret(own, list(canaries.values()), proc.stdout, proc.stderr)


def test_endpoint_without_its_key_sends_no_authorization(tmp_path: Path, cpu_server: dict) -> None:
    data, out = _input(tmp_path, 4), tmp_path / "out"
    assert "FORGE_UNSET_KEY_VAR" not in os.environ
    proc = forge_cli([*_args(cpu_server, data, out), "model.api_key_env=FORGE_UNSET_KEY_VAR"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FORGE_UNSET_KEY_VAR" in proc.stderr and "without an Authorization header" in proc.stderr
    assert len(rows_of(out)) == 4


def test_a_wrong_model_name_stops_the_run_and_pins_nothing(tmp_path: Path, cpu_server: dict, tiny_model: Path) -> None:
    """Every request refused alike (HTTP 400: the endpoint serves another model) is the config's
    fault, not 40 bad rows: forge stops after 16, keeps those rows retryable, and the corrected
    command (another model.name_or_path) is accepted and sends them again."""
    ids = [f"r{i}" for i in range(40)]
    data, out = _input(tmp_path, 40), tmp_path / "out"
    wrong = [*_args(cpu_server, data, out), "model.name_or_path=not/the-served-model", f"model.tokenizer={tiny_model}"]
    proc = forge_cli([*wrong, "run.max_in_flight=4"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "refused the first 16 requests alike (HTTP 400" in error_line(proc.stderr)
    assert all(r["retryable"] for r in rows_of(out, "rejected"))
    proc = forge_cli([*_args(cpu_server, data, out), "run.max_in_flight=4"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_exactly_once(out, ids, rejected_ok=False)
    assert rows_of(out, "rejected") == []
