"""The engine's own output reaches its log through forge, secrets masked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from forge.engine.server import pump_log
from forge.io import secrets


def test_engine_output_is_masked_in_its_log(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(secrets, "_extra_values", set())
    secrets.register_config_secrets({"engine_args": {"api-key": "CANARY-engine-echo-1"}})
    code = "print('non-default args: {\"api_key\": \"CANARY-engine-echo-1\"}'); print('ready', flush=True)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = tmp_path / "engine.log"
    pump_log(proc.stdout, log)
    proc.wait()
    text = log.read_text()
    assert "CANARY" not in text and "***" in text and "ready" in text
