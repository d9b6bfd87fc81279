"""The model's own tokenizer and chat template, for measuring prompts before they are sent.

Loaded from tokenizer.json with the `tokenizers` library and rendered with jinja2 the way
transformers renders chat templates — without importing transformers and torch, which costs
seconds of start-up. Models that ship no tokenizer.json fall back to transformers.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("forge.engine.tokenizer")
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")


class Tokenizer(Protocol):
    has_template: bool

    def render(self, messages: list[dict[str, str]], **kwargs: Any) -> str: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class FastTokenizer:
    """tokenizer.json + chat template; what forge uses when the model ships them."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (directory / "tokenizer_config.json").exists():
            config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        elif (directory / "chat_template.json").exists():
            template = json.loads((directory / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        self.has_template = bool(template)
        self._template = _compile(template) if template else None
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def render(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        if self._template is None:
            return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)
        return self._template.render(messages=messages, add_generation_prompt=True, **self.special, **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class TransformersTokenizer:
    """Fallback for models without tokenizer.json (slow tokenizers, custom code)."""

    def __init__(self, name: str, revision: str | None, trust_remote_code: bool) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        self.has_template = bool(getattr(self.tok, "chat_template", None))

    def render(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        if not self.has_template:
            return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


class TokenizerUnavailable(Exception):
    """Neither a local dir, the Hub cache, nor a reachable Hub repo has this tokenizer."""


def _hub_reachable(name: str, revision: str | None) -> None:
    """One quick look at the repo before any download: hf_hub_download and transformers each retry
    an unreachable Hub for about 23 s, so a name that is not a Hub model (an endpoint's
    `gpt-4.1-mini`) or an offline machine would cost a minute of start-up for nothing."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        HfApi().model_info(name, revision=revision, timeout=10)
    except OfflineModeIsEnabled as exc:
        raise TokenizerUnavailable(f"{name!r} is not in the local Hub cache and HF_HUB_OFFLINE is set") from exc
    except Exception as exc:  # unreachable, not found, gated: none of them gets better by retrying
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TokenizerUnavailable(
            f"{name!r} is neither a local directory nor a reachable Hub model ({reason})"
        ) from exc


def _local_files(name: str, revision: str | None) -> Path | None:
    """A directory holding the tokenizer files: the model dir itself, or a Hub download of them."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path if (path / "tokenizer.json").exists() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "tokenizer.json", revision=revision)
    if isinstance(cached, str):  # its snapshot dir holds the files fetched with it: no network
        return Path(cached).parent
    _hub_reachable(name, revision)
    found: Path | None = None
    for filename in FILES:
        try:
            found = Path(hf_hub_download(name, filename, revision=revision)).parent
        except Exception:  # optional files are missing on many repos
            if filename == "tokenizer.json":
                return None
    return found


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False) -> Tokenizer:
    directory = _local_files(name, revision)  # TokenizerUnavailable: transformers would only retry the same
    if directory is not None:
        return FastTokenizer(directory)
    return TransformersTokenizer(name, revision, trust_remote_code)
