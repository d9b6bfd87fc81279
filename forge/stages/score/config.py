"""The score stage's schema: `score:` in the config (conf/pipeline/score.yaml sets its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forge.schema import neutral

KINDS = ("nll", "embed", "classify")
CLASSIFIER_ENGINES = ("auto", "vllm", "transformers")
VIEWS = ("conversation", "user", "assistant")
ON_LONG = ("window", "quarantine")


@dataclass
class ScoreConfig:
    """What `forge pipeline=score` computes per row (forge/stages/score/).

    Attributes:
        kind: nll (completion-only negative log-likelihood under the model) | embed (a pooling
            model's embedding) | classify (a classifier's `score`, `label` and per-label
            probabilities; the classifier is the `classifier=` group, not `model=`).
        mask: nll: which tokens are scored, as tokenize.mask (assistant | last | all); documents
            are scored on every token. The mask is the tokenize stage's (forge/stages/tokenize/encode.py).
        reasoning: nll: assistant reasoning is scored.
        view: embed, classify: what is read: conversation | user (the user turns) | assistant (the answers).
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


@dataclass
class ClassifierConfig:
    """The classifier of `score.kind=classify` (conf/classifier/ presets; forge/stages/score/classify.py).

    Attributes:
        name_or_path: a local checkpoint or a Hub id in the local cache: a sequence-classification
            or regression model (BERT/DeBERTa-style encoders, `*ForSequenceClassification` decoders).
        engine: vllm (its pooling runner, GPU) | transformers (CPU) | auto (vllm when a GPU and
            vllm are present, else transformers).
        max_len: tokens read per row; a longer row is cut to them (as the classifiers were trained).
        score_label: a label model: `score` is that label's probability (e.g. High); null = the
            expected value when the labels are numbers ("0".."5"), else the top label's probability.
            A regression model's `score` is its raw output.
        batch_tokens: tokens (padding included) per forward pass on CPU / vLLM's max_num_batched_tokens.
        gpu_memory_utilization: vllm: the share of the GPU it may take.
        trust_remote_code: let transformers/vLLM run code shipped with the checkpoint.
        load_format: vllm: `dummy` runs random weights of the checkpoint's shapes (benchmarks).
        engine_args: vllm: more AsyncEngineArgs (`{enforce_eager: true}`), as model.engine_args.
    """

    name_or_path: str | None = None
    engine: str = neutral("auto")
    max_len: int = 512
    score_label: str | None = None
    batch_tokens: int = neutral(16384)
    gpu_memory_utilization: float = neutral(0.9)
    trust_remote_code: bool = False
    load_format: str = "auto"
    engine_args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from forge.schema import ConfigError

        if self.engine not in CLASSIFIER_ENGINES:
            raise ConfigError(f"classifier.engine: {self.engine!r}; one of {', '.join(CLASSIFIER_ENGINES)}")
        if self.max_len < 2:
            raise ConfigError(f"classifier.max_len: must be >= 2 (got {self.max_len})")
        if self.batch_tokens < self.max_len:
            raise ConfigError(f"classifier.batch_tokens: must be >= classifier.max_len ({self.max_len})")
