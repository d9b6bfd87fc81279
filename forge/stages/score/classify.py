"""score.kind=classify: a sequence-classification or regression checkpoint (the `classifier=`
group, conf/classifier/) scores every row: transformers on CPU, vLLM's pooling runner on GPU.

What a row gets: `score` (a regression model's raw output, FineWeb-Edu's 0-5 scale; for a label
model, see ClassifierConfig.score_label), `label` (the top label; null for regression) and one
`prob_<label>` column per label (softmax, or sigmoid for a multi-label checkpoint), so pools can
select on any of them (`score >= 3`, `prob_high >= 0.8`).

Rows longer than classifier.max_len tokens are cut to it, as these classifiers were trained.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from forge.schema import ConfigError
from forge.stages.score.backends import _done, _groups, engine_failed
from forge.stages.score.config import ClassifierConfig

log = logging.getLogger("forge.stages.score")


@dataclass
class Head:
    """What the checkpoint's config says about its outputs."""

    labels: list[str]  # id order; [] for regression
    multi_label: bool
    architecture: str

    @property
    def regression(self) -> bool:
        return not self.labels

    def columns(self) -> list[str]:
        """prob_<label> per label; labels that read the same as a column (`A+`, `A-`) get their
        index appended, the labels themselves unchanged."""
        names = [prob_column(x) for x in self.labels]
        if len(set(names)) != len(names):
            names = [f"{n}_{i}" for i, n in enumerate(names)]
        return names


def prob_column(label: str) -> str:
    return "prob_" + (re.sub(r"\W+", "_", label.strip().lower()).strip("_") or "label")


def nemo_config(path: str) -> dict[str, Any] | None:
    """The config of a NeMo Curator classifier (nvidia/quality-classifier-deberta,
    nvidia/domain-classifier): not a transformers checkpoint but a `base_model` backbone plus a
    linear head `fc` on the first token, saved by huggingface_hub's PyTorchModelHubMixin. None
    for any other checkpoint."""
    import json

    file = Path(path) / "config.json"
    try:
        conf = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return conf if "base_model" in conf and "model_type" not in conf else None


def read_head(path: str, trust_remote_code: bool = False) -> Head:
    from transformers import AutoConfig

    nemo = nemo_config(path)
    if nemo is not None:
        id2label = nemo.get("id2label") or {}
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))]
        return Head(labels, False, f"NeMo classifier on {nemo['base_model']}")
    try:
        conf = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"classifier.name_or_path={path}: cannot read its config ({exc})") from None
    n = int(getattr(conf, "num_labels", 1) or 1)
    problem = getattr(conf, "problem_type", None)
    arch = (getattr(conf, "architectures", None) or ["?"])[0]
    id2label = getattr(conf, "id2label", None) or {}
    labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]
    if n == 1:  # a regression head, unless the config says it is one label's logit (sigmoid)
        return (
            Head(labels, True, arch)
            if problem in ("single_label_classification", "multi_label_classification")
            else Head([], False, arch)
        )
    return Head(labels, problem == "multi_label_classification", arch)


def classify_fields(head: Head) -> list[pa.Field]:
    return [
        pa.field("score", pa.float64()),
        pa.field("label", pa.string()),
        *[pa.field(c, pa.float64()) for c in head.columns()],
    ]


def outputs_to_columns(raw: np.ndarray, head: Head, score_label: str | None) -> list[dict[str, Any]]:
    """(rows, num_labels) logits (regression: (rows, 1) outputs) as the row's new columns."""
    if head.regression:
        return [{"score": float(v[0]), "label": None} for v in raw]
    logits = raw.astype(np.float64)
    if head.multi_label:
        probs = 1 / (1 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
    numeric = all(re.fullmatch(r"-?\d+(\.\d+)?", x.strip()) for x in head.labels)
    values = np.array([float(x) for x in head.labels]) if numeric else None
    at = head.labels.index(score_label) if score_label is not None else None
    cols = head.columns()
    out = []
    for p in probs:
        top = int(np.argmax(p))
        if at is not None:
            score = float(p[at])
        elif values is not None:
            score = float((p * values).sum() / (p.sum() or 1))
        else:
            score = float(p[top])
        out.append({"score": score, "label": head.labels[top], **{c: float(x) for c, x in zip(cols, p, strict=True)}})
    return out


class NemoClassifier:
    """A NeMo Curator classifier as transformers modules: the `base_model` backbone built from its
    config (read from a local folder or the local Hub cache), the `fc` head on the first token's
    hidden state, both loaded from the checkpoint's model.safetensors (keys `model.*`, `fc.*`)."""

    def __init__(self, path: str, conf: dict[str, Any], trust_remote_code: bool = False) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        base = conf["base_model"]
        try:
            backbone_conf = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            raise ConfigError(
                f"classifier {path}: its backbone {base} is not in the local Hugging Face cache; fetch its "
                f"config once with `hf download {base} config.json`"
            ) from None
        self.backbone = AutoModel.from_config(backbone_conf).float().eval()
        weights = load_file(str(Path(path) / "model.safetensors"))
        labels = len(conf.get("id2label") or {})
        self.fc = torch.nn.Linear(backbone_conf.hidden_size, labels).float().eval()
        missing = self.backbone.load_state_dict(
            {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}, strict=False
        ).missing_keys
        if [k for k in missing if "position_ids" not in k]:
            raise ConfigError(f"classifier {path}: model.safetensors lacks backbone weights {missing[:3]}")
        self.fc.load_state_dict({"weight": weights["fc.weight"], "bias": weights["fc.bias"]})
        self.config = backbone_conf

    def __call__(self, input_ids: Any, attention_mask: Any) -> Any:
        from types import SimpleNamespace

        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return SimpleNamespace(logits=self.fc(hidden[:, 0]))


class TransformersClassifier:
    """AutoModelForSequenceClassification (or a NeMo classifier) on CPU (float32), rows grouped by length."""

    def __init__(self, path: str, cfg: ClassifierConfig) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.max_len = cfg.max_len
        self.batch_tokens = cfg.batch_tokens
        remote = cfg.trust_remote_code
        nemo = nemo_config(path)
        if nemo is not None:
            self.model: Any = NemoClassifier(path, nemo, remote)
            self.tokenizer = _nemo_tokenizer(path, nemo["base_model"], remote)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch.float32, trust_remote_code=remote
            ).eval()
        if self.tokenizer.pad_token_id is None:  # decoder classifiers: pad with EOS, as they were trained
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.context = min(
            cfg.max_len, getattr(self.model.config, "max_position_embeddings", cfg.max_len) or cfg.max_len
        )

    def wait_ready(self) -> None:
        pass

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.context)["input_ids"]

    def logits(self, seqs: list[list[int]]) -> np.ndarray:
        torch = self.torch
        out: list[np.ndarray] = [np.empty(0)] * len(seqs)
        pad = self.tokenizer.pad_token_id or 0
        for group in _groups([len(s) for s in seqs], self.batch_tokens):
            longest = max(len(seqs[i]) for i in group)
            ids = torch.full((len(group), longest), pad, dtype=torch.long)
            attn = torch.zeros((len(group), longest), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                attn[row, : len(seqs[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=attn).logits.float().numpy()
            for row, i in enumerate(group):
                out[i] = logits[row]
        return np.stack(out) if out else np.empty((0, 1))

    def submit(self, seqs: list[list[int]]) -> Future:
        return _done(self.logits(seqs))

    def close(self) -> None:
        pass


def _nemo_tokenizer(path: str, base: str, remote: bool) -> Any:
    """The checkpoint's own tokenizer files, else its backbone's."""
    from transformers import AutoTokenizer

    for source in (path, base):
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=remote)
        except (OSError, ValueError, TypeError):
            continue
    raise ConfigError(f"classifier {path}: no tokenizer in it or in the local cache of its backbone {base}")


def vllm_args(path: str, cfg: ClassifierConfig, seed: int | None) -> dict[str, Any]:
    """AsyncEngineArgs of the classifier: the pooling runner with vLLM's classify head, the
    classifier's length and batch, no prefix caching (each row is read once)."""
    kw: dict[str, Any] = {
        "model": path,
        "runner": "pooling",
        "convert": "classify",  # *ForSequenceClassification; a decoder gets vLLM's classify head
        "max_model_len": cfg.max_len,
        "max_num_batched_tokens": cfg.batch_tokens,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "trust_remote_code": cfg.trust_remote_code,
        "enable_prefix_caching": False,
        "load_format": cfg.load_format,
    }
    if seed is not None:  # generation.seed is null by default; vLLM takes an integer or nothing
        kw["seed"] = seed
    kw.update({k.replace("-", "_"): v for k, v in cfg.engine_args.items()})
    return kw


class VllmClassifier:
    """The classifier on vLLM's pooling runner (AsyncLLM on its own thread, like the score
    stage's VllmScorer): raw logits per row, the activation applied by forge (outputs_to_columns),
    so regression outputs are not squashed."""

    def __init__(self, path: str, cfg: ClassifierConfig, seed: int | None) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ConfigError("classifier.engine=vllm: vllm is not installed (pip install 'forge[vllm]')") from None
        self.max_len = cfg.max_len
        kw = vllm_args(path, cfg, seed)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="forge-classify-engine", daemon=True)
        self.thread.start()
        self.llm: Any = None
        self.starting = asyncio.run_coroutine_threadsafe(self._start(kw), self.loop)
        self.tokenizer: Any = None
        self.context = cfg.max_len

    async def _start(self, kw: dict[str, Any]) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from forge.engine.server import EngineError

        try:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
        except Exception as exc:
            raise EngineError(f"vLLM failed to start the classifier: {exc.__class__.__name__}: {exc}") from exc

    def wait_ready(self) -> None:
        if self.llm is None:
            self.llm = self.starting.result()
            from transformers import AutoTokenizer

            path = self.llm.vllm_config.model_config.tokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.context = min(self.max_len, self.llm.vllm_config.model_config.max_model_len)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.context)["input_ids"]

    async def _logits(self, seqs: list[list[int]]) -> np.ndarray:
        from vllm import PoolingParams

        # task set: left None, vLLM picks token_classify (per-token outputs); raw logits, so a
        # regression head is not squashed and forge applies softmax/sigmoid itself
        params = PoolingParams(task="classify", use_activation=False)

        async def one(ids: list[int]) -> np.ndarray:
            final = None
            try:
                async for out in self.llm.encode({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
                    final = out
            except Exception as exc:
                raise engine_failed(exc) from exc
            return np.asarray(final.outputs.data.float().cpu().numpy(), dtype=np.float32).reshape(-1)

        rows = await asyncio.gather(*(one(s) for s in seqs))
        return np.stack(rows) if rows else np.empty((0, 1))

    def submit(self, seqs: list[list[int]]) -> Future:
        return asyncio.run_coroutine_threadsafe(self._logits(seqs), self.loop)

    def close(self) -> None:
        try:
            llm = self.llm or self.starting.result()
        except Exception:
            llm = None
        if llm is not None:
            try:
                llm.shutdown()
            except Exception as exc:
                log.warning("vLLM shutdown: %s", exc)
        self.llm = None
        self.loop.call_soon_threadsafe(self.loop.stop)


def choose_engine(cfg: ClassifierConfig, path: str) -> str:
    """classifier.engine with auto decided: vLLM when a GPU and vLLM are present and it runs the
    checkpoint (NeMo's own format and DeBERTa do not run on vLLM 0.26), else transformers."""
    vllm_cannot = nemo_config(path) is not None or "Deberta" in read_head(path, cfg.trust_remote_code).architecture
    if cfg.engine == "vllm" and vllm_cannot:
        raise ConfigError(
            f"classifier.engine=vllm: vLLM does not run {cfg.name_or_path} (DeBERTa backbones and NeMo's "
            "checkpoint format are not in vLLM's model registry); use classifier.engine=transformers"
        )
    if cfg.engine != "auto":
        return cfg.engine
    if vllm_cannot:
        return "transformers"
    try:
        import torch

        if not torch.cuda.is_available():
            return "transformers"
        import vllm  # noqa: F401
    except ImportError:
        return "transformers"
    return "vllm"


def resolve_classifier(cfg: ClassifierConfig) -> str:
    """The checkpoint's local path: a folder, or a Hub id from the local cache (no download)."""
    name = cfg.name_or_path
    if not name:
        raise ConfigError(
            "score.kind=classify needs a classifier: classifier=<preset> (conf/classifier/: "
            "fineweb_edu, ...) or classifier.name_or_path=<a local checkpoint or cached Hub id>"
        )
    from forge.stages.score.tiny_classifier import TINY_CLASSIFIERS, ensure_tiny_classifier

    if name in TINY_CLASSIFIERS:
        return str(ensure_tiny_classifier(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ConfigError(
            f"classifier.name_or_path={name}: not a local folder and not in the local Hugging Face cache; "
            f"forge downloads nothing at run time: fetch it once with `hf download {name}`"
        ) from None


def make_classifier(cfg: ClassifierConfig, path: str, seed: int | None) -> TransformersClassifier | VllmClassifier:
    if choose_engine(cfg, path) == "vllm":
        return VllmClassifier(path, cfg, seed)
    return TransformersClassifier(path, cfg)
