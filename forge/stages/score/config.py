"""The score stage's schema: `score:` in the config (conf/pipeline/score.yaml sets its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from forge.schema import neutral

KINDS = ("nll", "embed")
VIEWS = ("conversation", "user", "assistant")
ON_LONG = ("window", "quarantine")


@dataclass
class ScoreConfig:
    """What `forge pipeline=score` computes per row (forge/stages/score/).

    Attributes:
        kind: nll (completion-only negative log-likelihood under the model) | embed (a pooling
            model's embedding).
        mask: nll: which tokens are scored, as tokenize.mask (assistant | last | all); documents
            are scored on every token. The mask is the tokenize stage's (forge/stages/tokenize/encode.py).
        reasoning: nll: assistant reasoning is scored.
        view: embed: what is embedded: conversation | user (the user turns) | assistant (the answers).
        max_len: tokens the model sees at once; null = model.max_model_len, else the model's context.
        on_long: nll: a row longer than max_len is scored in overlapping windows (window) or
            quarantined (quarantine); embed always quarantines it.
        overlap: window: tokens of context each window after the first repeats (at most max_len - 1).
        batch_tokens: tokens (padding included) per forward pass on CPU / per engine call on vLLM:
            prompt log-probabilities are not in vLLM's KV sizing, so this bounds their memory.
        per_token: nll: also the columns `scored_token_ids` and `token_nll`: each scored token
            and its NLL, in order (for audits and token-level selection; large).
        npy: embed: also write embeddings.npy (rows in data/ order) and embeddings_ids.json.
        pools: named subsets by score, `{name: expression}` over the output columns;
            `quantile(q)` is the q-quantile of the compared column over the whole run.
        bins: histogram bins of the card's score plot.
    """

    kind: str = "nll"
    mask: str = "assistant"
    reasoning: bool = True
    view: str = "conversation"
    max_len: int | None = None
    on_long: str = "window"
    overlap: int = 256
    batch_tokens: int = neutral(8192)
    per_token: bool = False
    npy: bool = False
    pools: dict[str, str] = field(default_factory=dict)
    bins: int = neutral(40)

    def validate(self) -> None:
        from forge.schema import ConfigError

        for key, allowed in (("kind", KINDS), ("view", VIEWS), ("on_long", ON_LONG)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"score.{key}: {getattr(self, key)!r}; one of {', '.join(allowed)}")
        if self.mask not in ("assistant", "last", "all"):
            raise ConfigError(f"score.mask: {self.mask!r}; one of assistant, last, all")
        for key in ("batch_tokens", "bins"):
            if getattr(self, key) < 1:
                raise ConfigError(f"score.{key}: must be >= 1 (got {getattr(self, key)})")
        if self.max_len is not None and self.max_len < 2:
            raise ConfigError(f"score.max_len: must be >= 2 (got {self.max_len})")
        if self.overlap < 0:
            raise ConfigError(f"score.overlap: must be >= 0 (got {self.overlap})")
