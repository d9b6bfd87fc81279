"""score.kind=classify on CPU with tiny random-weight classifiers built at test time: a BERT
regression head (FineWeb-Edu's shape) and a Qwen3 decoder with three labels; scores equal a
direct transformers forward pass, probabilities and labels, pools by score, long rows cut to
classifier.max_len, and the config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import forge_cli, read_rows, read_stats, write_jsonl

from forge.stages.score.tiny_classifier import ensure_tiny_classifier

pytestmark = pytest.mark.slow

TEXTS = [
    f"lesson {i}: " + "the river carries water to the sea and the sun lifts it back as rain " * (1 + i % 4)
    for i in range(24)
]


def _direct(path: Path, texts: list[str], max_len: int = 512) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for t in texts:  # one row at a time: no padding at all
        ids = tok(t, truncation=True, max_length=max_len, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out.append(model(input_ids=ids).logits[0].numpy())
    return np.stack(out)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pipeline=score", "score.kind=classify", f"dataset.name={data}", f"output.dir={out}", *extra]


def test_regression_scores_match_transformers_and_pool(tmp_path: Path, forge_cache: Path) -> None:
    data = write_jsonl(tmp_path / "web.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)])
    out = tmp_path / "cls"
    proc = forge_cli(_args(data, out, "classifier=tiny_cpu", "+score.pools.top=score >= quantile(0.75)"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sorted(read_rows(out), key=lambda r: int(r["source"]["id"][1:]))
    want = _direct(ensure_tiny_classifier("forge://tiny-bert-regression"), TEXTS)[:, 0]
    got = np.array([r["score"] for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert all(r["label"] is None for r in rows)
    stats = read_stats(out)
    assert stats["pools"]["top"] == sum(got >= np.quantile(got, 0.75))
    assert stats["score"]["kind"] == "classify" and "0.5" in stats["score"]["score_quantiles"]


def test_label_model_probabilities_labels_and_score_label(tmp_path: Path, forge_cache: Path) -> None:
    """A decoder classifier (Qwen3ForSequenceClassification): softmax per label, the top label,
    and `score` = the chosen label's probability; rows longer than max_len are cut, not dropped."""
    rows_in = [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)]
    rows_in.append({"id": "long", "text": "word " * 3000})
    data = write_jsonl(tmp_path / "web.jsonl", rows_in)
    out = tmp_path / "cls"
    extra = [
        "classifier=tiny_cpu",
        "classifier.name_or_path=forge://tiny-qwen3-labels",
        "classifier.max_len=64",
        "classifier.score_label=high",
        "+score.pools.high=label == 'high'",
    ]
    proc = forge_cli(_args(data, out, *extra), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["source"]["id"]: r for r in read_rows(out)}
    assert len(rows) == 25 and not read_rows(out, "rejected")
    path = ensure_tiny_classifier("forge://tiny-qwen3-labels")
    texts = [r["text"] for r in rows_in]
    logits = _direct(path, texts, max_len=64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for r, p in zip(rows_in, probs, strict=True):
        row = rows[r["id"]]
        np.testing.assert_allclose([row["prob_low"], row["prob_medium"], row["prob_high"]], p, atol=1e-4)
        assert row["label"] == ["low", "medium", "high"][int(np.argmax(p))]
        assert row["score"] == pytest.approx(row["prob_high"])
    stats = read_stats(out)
    assert stats["pools"]["high"] == sum(r["label"] == "high" for r in rows.values())
    assert sum(stats["score"]["labels"].values()) == 25


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b c"}])
    cases = [
        ([], "score.kind=classify needs a classifier"),
        (["classifier=tiny_cpu", "classifier.score_label=great"], "classifier.score_label='great'"),
        (["classifier=tiny_cpu", "classifier.engine=onnx"], "classifier.engine"),
        (["classifier.name_or_path=nobody/no-such-classifier"], "not in the local Hugging Face cache"),
    ]
    for extra, words in cases:
        proc = forge_cli(_args(data, tmp_path / "o", *extra), tmp_path)
        assert proc.returncode == 2 and words in proc.stderr, (extra, proc.stderr[-1500:])
        assert json.dumps(words)[1:-1].split("=")[0] in proc.stderr


def _tiny_nemo_classifier(root: Path) -> Path:
    """A NeMo Curator-format classifier (config `base_model`, weights `model.*` + `fc.*`) with a
    tiny random DeBERTa-v2 backbone whose config lives in a local folder."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, DebertaV2Config

    from forge.engine.tiny_model import build_tokenizer

    base, ckpt = root / "deberta-base", root / "quality"
    base.mkdir(parents=True)
    ckpt.mkdir()
    build_tokenizer(ckpt)
    conf = DebertaV2Config(
        vocab_size=1100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    conf.save_pretrained(base)
    torch.manual_seed(1)
    backbone = AutoModel.from_config(conf)
    weights = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    weights["fc.weight"], weights["fc.bias"] = torch.randn(3, 64), torch.randn(3)
    save_file(weights, ckpt / "model.safetensors")
    labels = {"0": "High", "1": "Medium", "2": "Low"}
    (ckpt / "config.json").write_text(json.dumps({"base_model": str(base), "fc_dropout": 0.2, "id2label": labels}))
    return ckpt


def test_nemo_format_classifier_on_transformers(tmp_path: Path) -> None:
    """NeMo's own checkpoint format: the backbone's CLS state through `fc`, softmax; score = P(High);
    vLLM refused by name (it has no DeBERTa)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer, DebertaV2Config

    ckpt = _tiny_nemo_classifier(tmp_path / "nemo")
    data = write_jsonl(tmp_path / "web.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS[:6])])
    out = tmp_path / "cls"
    extra = ["classifier=nemo_quality", f"classifier.name_or_path={ckpt}", "classifier.max_len=128"]
    proc = forge_cli(_args(data, out, *extra), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = load_file(str(ckpt / "model.safetensors"))
    backbone = AutoModel.from_config(DebertaV2Config.from_pretrained(tmp_path / "nemo" / "deberta-base")).eval()
    backbone.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")}, strict=False)
    tok = AutoTokenizer.from_pretrained(ckpt)
    for row in read_rows(out):
        ids = tok(row["text"], truncation=True, max_length=128, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logits = backbone(input_ids=ids).last_hidden_state[0, 0] @ weights["fc.weight"].T + weights["fc.bias"]
        p = torch.softmax(logits, -1).numpy()
        np.testing.assert_allclose([row["prob_high"], row["prob_medium"], row["prob_low"]], p, atol=1e-4)
        assert row["score"] == pytest.approx(row["prob_high"]) and row["label"] == "High Medium Low".split()[p.argmax()]
    refused = forge_cli(_args(data, tmp_path / "o2", *extra, "classifier.engine=vllm"), tmp_path)
    assert refused.returncode == 2 and "vLLM does not run" in refused.stderr, refused.stderr[-1500:]


def test_vllm_engine_arguments() -> None:
    """What the classifier asks of vLLM (checked here; the GPU run is benchmarks/classify_gpu.py):
    the pooling runner with the classify head, no seed when generation.seed is null (vLLM refuses
    None), engine_args last."""
    from forge.stages.score.classify import vllm_args
    from forge.stages.score.config import ClassifierConfig

    cfg = ClassifierConfig(name_or_path="x", max_len=256, load_format="dummy", engine_args={"enforce-eager": True})
    kw = vllm_args("/m", cfg, None)
    assert kw["runner"] == "pooling" and kw["convert"] == "classify" and kw["max_model_len"] == 256
    assert "seed" not in kw and kw["enforce_eager"] is True and kw["load_format"] == "dummy"
    assert vllm_args("/m", cfg, 7)["seed"] == 7
