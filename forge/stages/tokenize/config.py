"""The tokenize stage's schema: `tokenize:` in the config (conf/pipeline/tokenize.yaml sets its defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from forge.schema import neutral

FORMATS = ("megatron", "npy")
MASKS = ("assistant", "last", "all")
ON_DROPPED = ("quarantine", "keep")


@dataclass
class TokenizeConfig:
    """What `forge pipeline=tokenize` writes (forge/stages/tokenize/).

    Attributes:
        tokenizer: a local tokenizer dir or a Hub id already in the local cache; null = the model's
            (model.tokenizer, else model.name_or_path: the tiny model by default, built offline).
        format: megatron (.bin/.idx as Megatron-LM's indexed dataset writes them, plus a loss-mask
            .mask.bin/.mask.idx in the same layout) | npy (.tokens.npy, .mask.npy, .docs.npy).
        seq_len: the training sequence length: recorded in index.json (the loader's default) and
            counted per shard in stats.json; sequences are packed when read (forge.data.TokenShards).
        shard_tokens: tokens per output shard at most (shards end at document boundaries); a row
            longer than this is quarantined.
        mask: which tokens of a chat carry the loss: assistant (every assistant turn) | last (the
            last assistant turn) | all (every token). Documents: every token.
        reasoning: assistant reasoning (as the chat template renders it) is in the loss mask.
        eos: end every document with the tokenizer's EOS token.
        workers: processes that tokenize (null = every core).
        on_dropped: what to do with a chat whose assistant turn has tool calls or reasoning (when
            `reasoning` trains on it) that the chat template does not render: quarantine (the
            row goes to rejected/, filter `dropped_content`, naming the turn and what was dropped)
            | keep (tokenized as the template renders it, counted per kind in stats.json
            `tokenize.kept_with_dropped_content` and the card).
            Either way a turn left with nothing but markup to train on is never trained on.
        fast: encode documents with tiktoken (several times faster per core) where it gives exactly
            the ids of the tokenizer (checked on its whole vocabulary at start; forge/stages/tokenize/fast.py).
    """

    tokenizer: str | None = None
    format: str = "megatron"
    seq_len: int | None = None
    shard_tokens: int = 100_000_000
    mask: str = "assistant"
    reasoning: bool = True
    eos: bool = True
    workers: int | None = neutral(None)
    fast: bool = neutral(True)
    on_dropped: str = "quarantine"

    def validate(self) -> None:
        from forge.schema import ConfigError

        if self.format not in FORMATS:
            raise ConfigError(f"tokenize.format: {self.format!r}; one of {', '.join(FORMATS)}")
        if self.on_dropped not in ON_DROPPED:
            raise ConfigError(f"tokenize.on_dropped: {self.on_dropped!r}; one of {', '.join(ON_DROPPED)}")
        if self.mask not in MASKS:
            raise ConfigError(f"tokenize.mask: {self.mask!r}; one of {', '.join(MASKS)}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"tokenize.seq_len: must be >= 1 (got {self.seq_len})")
        if self.shard_tokens < 1:
            raise ConfigError(f"tokenize.shard_tokens: must be >= 1 (got {self.shard_tokens})")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"tokenize.workers: must be >= 1 (got {self.workers})")
