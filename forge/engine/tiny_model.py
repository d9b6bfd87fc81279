"""A tiny random-weight Qwen3 model built locally, so forge runs offline with no download.

The shapes are Qwen3's, shrunk: real architecture, real compute, noise for output.
float32 and untied embeddings keep greedy output deterministic and non-empty.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_WORDS = (
    "the of and to in is was for on that with as by at from this be are it an or which "
    "data model token text document question answer summary write explain list describe "
    "brief short long first second third science history math physics chemistry biology "
    "language code python function value number string table row column file shard chunk "
    "system user assistant reason think step result because therefore however example "
    "water light energy cell planet star river mountain city country people time year day "
    "what why how when where who please give three ideas about following paragraph below "
    "good bad new old small large fast slow high low true false one two four five ten"
).split()
MODEL_VERSION = "1"  # bump when the recipe changes, so cached copies are rebuilt


def default_cache_dir() -> Path:
    """Where generated models live: $FORGE_CACHE or ~/.cache/forge."""
    return Path(os.environ.get("FORGE_CACHE", Path.home() / ".cache" / "forge"))


def _corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 24))]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":"]))
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 1024) -> None:
    """Train a byte-level BPE with ChatML specials and save it as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(out_dir)


def qwen3_config(vocab: int, eos: int, pad: int, **extra: Any) -> Any:
    """The tiny Qwen3's shapes (hidden 64, 2 layers, 4 heads), float32; `extra` adds config keys
    (a classification head's labels)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        eos_token_id=eos,
        pad_token_id=pad,
        torch_dtype="float32",
        **extra,
    )


def build_model(out_dir: Path, seed: int = 0) -> None:
    """Write a seeded random-weight Qwen3 (hidden 64, 2 layers) next to its tokenizer."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen3ForCausalLM

    build_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    config = qwen3_config(len(tok), eos=eos, pad=pad, tie_word_embeddings=False, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, eos_token_id=eos, pad_token_id=pad
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "forge_tiny_model.json").write_text(json.dumps({"version": MODEL_VERSION}))


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return the cached tiny model dir, building it once (locked against concurrent builds)."""
    root = Path(cache_dir or default_cache_dir()) / "models"
    target = root / f"tiny-qwen3-v{MODEL_VERSION}"
    marker = target / "forge_tiny_model.json"
    if marker.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".tiny-qwen3.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-qwen3-", dir=root))
        try:
            build_model(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


TINY = "forge://tiny-qwen3"


def resolve_model(name_or_path: str) -> str:
    if name_or_path == TINY:
        return str(ensure_tiny_model())
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path
