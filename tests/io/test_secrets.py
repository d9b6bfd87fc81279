"""The one masking path: secret keys in any spelling, registered values, engine command lines."""

from __future__ import annotations

import io
import os

import pytest

from forge.io import secrets
from forge.io.secrets import (
    MASK,
    RedactingStream,
    is_secret_key,
    lift_secrets,
    redact,
    redact_command,
    redact_override,
    redact_text,
    register_config_secrets,
    register_override_secrets,
)


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "_extra_values", set())
    monkeypatch.setattr(secrets, "_extra_env", set())


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "api-key",
        "apiKey",
        "X-Api-Key",
        "hf_token",
        "Authorization",
        "client_secret",
        "password",
        "db.password",
        "OPENAI_API_KEY",
        "access-token",
        "secret",
        "--api-key",
        "+model.engine_args.api-key",
        "Cookie",
    ],
)
def test_secret_keys_in_any_spelling(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key", ["max_tokens", "api_key_env", "keep_columns", "id_column", "tokenizer", "kv_cache_dtype", "seed", "rollout"]
)
def test_ordinary_keys_are_not_secret(key: str) -> None:
    assert not is_secret_key(key)


def test_config_values_are_registered_and_masked_everywhere() -> None:
    tree = {
        "model": {"engine_args": {"api-key": "CANARY-args-0001"}, "api_key_env": "MY_KEY"},
        "generation": {"extra_body": {"headers": {"Authorization": "Bearer CANARY-bearer-0002"}}},
    }
    register_config_secrets(tree)
    line = "vllm serve m --api-key CANARY-args-0001 and a header Bearer CANARY-bearer-0002"
    assert "CANARY" not in redact_text(line)
    # a bare token whose Bearer prefix was stripped is known too
    assert "CANARY" not in redact_text("token=CANARY-bearer-0002")
    dumped = redact(tree)
    assert dumped["model"]["engine_args"]["api-key"] == MASK
    assert dumped["model"]["api_key_env"] == "MY_KEY"  # a variable's name is no secret
    assert dumped["generation"]["extra_body"]["headers"]["Authorization"] == MASK


def test_overrides_and_command_lines() -> None:
    register_override_secrets(["+model.engine_args.api-key=CANARY-cli-0003", "dataset.name=x"])
    assert "CANARY" not in redact_text("echo CANARY-cli-0003")
    assert redact_override("+model.engine_args.api-key=whatever1") == f"+model.engine_args.api-key={MASK}"
    assert redact_override("dataset.name=x") == "dataset.name=x"
    shown = redact_command(
        ["vllm", "serve", "m", "--api-key", "unknown-secret-1", "--hf-token=unknown-2", "--port", "1"]
    )
    assert "unknown" not in shown and "--port 1" in shown


def test_env_secrets_and_token_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_VAR", "env-secret-value-42")
    secrets.register_secret_env("MY_VAR")
    assert redact_text("x env-secret-value-42 y") == f"x {MASK} y"
    assert redact_text("hf_" + "a" * 30) == MASK


def test_streams_are_masked() -> None:
    register_override_secrets(["x.token=CANARY-stream-0004"])
    buf = io.StringIO()
    RedactingStream(buf).write("printed CANARY-stream-0004\n")
    assert buf.getvalue() == f"printed {MASK}\n"


def test_lift_secrets_for_pickles() -> None:
    tree = {"model": {"engine_args": {"api-key": "CANARY-pickle-0005", "port": 1}}}
    lifted, env = lift_secrets(tree)
    assert "CANARY" not in repr(lifted)
    ref = lifted["model"]["engine_args"]["api-key"]
    name = ref[len("${oc.env:") : -1]
    assert env[name] == "CANARY-pickle-0005" and lifted["model"]["engine_args"]["port"] == 1
    from omegaconf import OmegaConf

    os.environ[name] = env[name]
    try:
        assert OmegaConf.create(lifted).model.engine_args["api-key"] == "CANARY-pickle-0005"
    finally:
        del os.environ[name]


def test_secrets_inside_string_values() -> None:
    register_config_secrets(
        {
            "model": {"endpoint_url": "http://me:CANARY-url-0006@gpu-box:8000"},
            "cluster": {"setup": ["export MY_API_KEY=CANARY-setup-0007", "module load cuda"]},
            "engine_line": "serve --hf-token CANARY-flag-0008 --port 1",
        }
    )
    for canary in ("CANARY-url-0006", "CANARY-setup-0007", "CANARY-flag-0008"):
        assert canary not in redact_text(f"x {canary} y")
    assert redact_text("http://u:unknown-pass@h/") == f"http://u:{MASK}@h/"
    assert "module load cuda" == redact_text("module load cuda")


def test_every_written_table_is_masked_without_rewriting_data_for_a_placeholder_key() -> None:
    import pyarrow as pa

    from forge.io.secrets import redact_table, register_secret_value

    long_key, placeholder = "sk-tablesecret-0123456789abcdef", "EMPTY"
    register_secret_value(long_key)
    register_secret_value(placeholder)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    messages = pa.list_(pa.field("element", message))
    table = pa.table(
        {
            "id": [f"id-{long_key}", "b"],
            "reason": [f"failed with {placeholder} and {long_key}", None],
            "messages": pa.array([[{"role": "user", "content": f"{long_key} {placeholder}"}], None], messages),
            "text": [f"{placeholder} is a word here", "plain"],
        }
    )
    for t in (table, table.slice(1), table.slice(0, 1)):
        out = redact_table(t)
        assert out.schema == t.schema  # nested field names kept (list<element: ...>)
    rows = redact_table(table).to_pylist()
    assert rows[0]["reason"] == "failed with *** and ***"  # diagnostics: every known value
    assert rows[0]["messages"][0]["content"] == f"*** {placeholder}"  # data: real-length keys only
    assert rows[0]["text"] == f"{placeholder} is a word here"
    assert rows[0]["id"] == f"id-{long_key}"  # ids are matched against the input on resume
