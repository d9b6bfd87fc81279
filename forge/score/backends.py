"""The engines that score: per-token log-probabilities of a token sequence, or one embedding per
text. On CPU, transformers (the tiny model in tests); on GPU, vLLM in this process: prompt
log-probabilities of one forward pass with no generation, or a pooling model.

Memory: rows are sorted by length and sent in groups of at most `score.batch_tokens` tokens
(padding included) on CPU; on vLLM the same number is the engine's max_num_batched_tokens, so the
log-probabilities computed per engine step (tokens x vocabulary floats) stay bounded: prompt
log-probabilities are not part of vLLM's KV-cache sizing.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from forge.config import ConfigError, EngineKind, ForgeConfig

log = logging.getLogger("forge.score")
VLLM_ROWS_PER_CALL = 4096  # rows handed to the engine at once (bounds the Python-side results)


def _groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices in groups whose (longest x count) stays within budget, shortest rows first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and lengths[i] * (len(current) + 1) > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


class TransformersScorer:
    """NLL or embeddings with transformers on CPU (float32)."""

    def __init__(self, model_path: str, kind: str, batch_tokens: int) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.kind = kind
        self.batch_tokens = batch_tokens
        config = AutoConfig.from_pretrained(model_path)
        self.context = getattr(config, "max_position_embeddings", None)
        cls = AutoModelForCausalLM if kind == "nll" else AutoModel
        self.model = cls.from_pretrained(model_path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path) if kind == "embed" else None

    def count(self, texts: list[str]) -> list[int]:
        return [len(x) for x in self.tokenizer(texts)["input_ids"]]

    def token_logprobs(self, seqs: list[np.ndarray]) -> list[np.ndarray]:
        """log p(s[t] | s[:t]) for t = 1..len(s)-1, per sequence (float64)."""
        torch = self.torch
        out: list[np.ndarray] = [np.empty(0)] * len(seqs)
        for group in _groups([len(s) for s in seqs], self.batch_tokens):
            longest = max(len(seqs[i]) for i in group)
            ids = torch.zeros((len(group), longest), dtype=torch.long)
            attn = torch.zeros((len(group), longest), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(seqs[i])] = torch.from_numpy(seqs[i].astype(np.int64))
                attn[row, : len(seqs[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=attn).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            for row, i in enumerate(group):
                out[i] = logp[row, : len(seqs[i]) - 1].double().numpy()
        return out

    def embed(self, texts: list[str]) -> list[np.ndarray]:
        """Mean of the last hidden states over the text's tokens, L2-normalized (float32)."""
        torch = self.torch
        seqs = [np.asarray(x) for x in self.tokenizer(texts)["input_ids"]]
        out: list[np.ndarray] = [np.empty(0)] * len(seqs)
        for group in _groups([len(s) for s in seqs], self.batch_tokens):
            longest = max(len(seqs[i]) for i in group)
            ids = torch.zeros((len(group), longest), dtype=torch.long)
            attn = torch.zeros((len(group), longest), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(seqs[i])] = torch.from_numpy(seqs[i].astype(np.int64))
                attn[row, : len(seqs[i])] = 1
            with torch.inference_mode():
                hidden = self.model(input_ids=ids, attention_mask=attn).last_hidden_state.float()
                pooled = (hidden * attn[..., None]).sum(1) / attn.sum(1, keepdim=True)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for row, i in enumerate(group):
                out[i] = pooled[row].numpy().astype(np.float32)
        return out


class VllmScorer:
    """NLL from vLLM's prompt log-probabilities (one forward pass per row, no generation), or
    embeddings from a vLLM pooling model, in this process."""

    def __init__(self, cfg: ForgeConfig, model_path: str, kind: str, batch_tokens: int) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ConfigError("model.engine=vllm: vllm is not installed (pip install 'forge[vllm]')") from None
        from forge.engine.inprocess import engine_kwargs

        kw = engine_kwargs(cfg.model, model_path, cfg.generation.seed)
        kw["max_num_batched_tokens"] = cfg.model.max_num_batched_tokens or batch_tokens
        kw.setdefault("enable_prefix_caching", False)  # each row is scored once: nothing to reuse
        if kind == "embed":
            kw["runner"] = "pooling"
        self.llm = LLM(**kw)
        self.kind = kind
        self.context = self.llm.llm_engine.model_config.max_model_len
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)

    def _prompts(self, seqs: list[np.ndarray]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=s.astype(np.int64).tolist()) for s in seqs]

    def token_logprobs(self, seqs: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for lo in range(0, len(seqs), VLLM_ROWS_PER_CALL):
            part = seqs[lo : lo + VLLM_ROWS_PER_CALL]
            results = self.llm.generate(self._prompts(part), self.params, use_tqdm=False)
            for s, r in zip(part, results, strict=True):
                lps = r.prompt_logprobs
                out.append(np.array([lps[t][int(s[t])].logprob for t in range(1, len(s))], dtype=np.float64))
        return out

    def count(self, texts: list[str]) -> list[int]:
        tok = self.llm.get_tokenizer()
        return [len(x) for x in tok(texts)["input_ids"]]

    def embed(self, texts: list[str]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for lo in range(0, len(texts), VLLM_ROWS_PER_CALL):
            results = self.llm.embed(texts[lo : lo + VLLM_ROWS_PER_CALL], use_tqdm=False)
            out += [np.asarray(r.outputs.embedding, dtype=np.float32) for r in results]
        return out


def make_scorer(cfg: ForgeConfig, model_path: str) -> Any:
    engine = cfg.model.engine
    if engine == EngineKind.transformers:
        return TransformersScorer(model_path, cfg.score.kind, cfg.score.batch_tokens)
    if engine in (EngineKind.vllm, EngineKind.vllm_async):
        return VllmScorer(cfg, model_path, cfg.score.kind, cfg.score.batch_tokens)
    raise ConfigError(
        f"model.engine={engine.value}: pipeline=score runs the model in this process; use model.engine=vllm "
        "(GPU) or transformers (CPU)"
    )
