"""Tiny random-weight classifiers built locally (no download), for tests, the README's offline
example and the CPU default: real architectures (a BERT encoder with a regression head, as the
FineWeb-Edu classifier; a Qwen3 decoder with a 3-label head, as reward/quality classifiers),
shrunk, with the tiny model's BPE tokenizer. `classifier.name_or_path=forge://tiny-bert-regression`
or `forge://tiny-qwen3-labels` builds one on first use under $FORGE_CACHE/models."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from forge.engine.tiny_model import build_tokenizer, default_cache_dir, qwen3_config

VERSION = "1"
TINY_CLASSIFIERS = {
    "forge://tiny-bert-regression": ("bert", None),
    "forge://tiny-qwen3-labels": ("qwen3", ["low", "medium", "high"]),
}


def build_classifier(out_dir: Path, arch: str, labels: list[str] | None, seed: int = 0) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        Qwen3ForSequenceClassification,
    )

    build_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    head = {"num_labels": 1, "problem_type": "regression"}
    if labels:
        head = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {x: i for i, x in enumerate(labels)},
            "problem_type": "single_label_classification",
        }
    torch.manual_seed(seed)
    if arch == "bert":
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
            pad_token_id=pad,
            **head,
        )
        model = BertForSequenceClassification(config)
    else:
        config = qwen3_config(len(tok), eos=tok.convert_tokens_to_ids("<|im_end|>"), pad=pad, **head)
        model = Qwen3ForSequenceClassification(config)
    with torch.no_grad():  # a spread of outputs (random heads give near-constant scores)
        for name, p in model.named_parameters():
            if "classifier" in name or name.startswith("score"):
                p.normal_(0, 2.0)
    model.to(torch.float32).save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "forge_tiny_model.json").write_text(json.dumps({"version": VERSION}))


def ensure_tiny_classifier(name: str, cache_dir: Path | None = None) -> Path:
    """The cached tiny classifier `name` (a key of TINY_CLASSIFIERS), built once under a lock."""
    arch, labels = TINY_CLASSIFIERS[name]
    root = Path(cache_dir or default_cache_dir()) / "models"
    target = root / f"{name.removeprefix('forge://')}-v{VERSION}"
    if (target / "forge_tiny_model.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "forge_tiny_model.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            build_classifier(tmp, arch, labels)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
