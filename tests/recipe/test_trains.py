"""Proof that a recipe's output trains: the tiny model, a few dozen optimizer steps on CPU on the
tiny recipe's tokenized shards read through forge.data. The loss over the masked tokens falls, and
tokens outside the loss mask (prompts, template markup, document boundaries) carry no gradient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from forge.data import IGNORE, TokenShards

STEPS = 40
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_recipe")]


def _batch(ds: TokenShards, idx: list[int]) -> dict[str, torch.Tensor]:
    items = ds.__getitems__(idx)
    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in ("input_ids", "labels", "position_ids")}


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1), ignore_index=IGNORE
    )
    return loss, logits


def test_the_tiny_recipe_output_trains_the_tiny_model(tiny_recipe: Path, tiny_model: Path) -> None:
    torch.manual_seed(0)
    ds = TokenShards(tiny_recipe / "tokenize")  # seq_len from the recipe's index.json (64)
    assert ds.seq_len == 64 and len(ds) >= 16
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    model.train()

    # tokens outside the loss mask carry no gradient; those inside do
    batch = _batch(ds, list(range(8)))
    masked = batch["labels"] == IGNORE
    assert masked.any() and (~masked).any(), "the batch should hold both prompt and assistant tokens"
    loss, logits = _loss(model, batch)
    logits.retain_grad()
    loss.backward()
    grad = logits.grad.abs().sum(-1)
    assert torch.count_nonzero(grad[masked]) == 0
    assert torch.count_nonzero(grad[~masked]) == int((~masked).sum())
    model.zero_grad()

    # the masked loss falls over a few dozen AdamW steps on a fixed set of sequences
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = [list(range(i, i + 8)) for i in range(0, 16, 8)]
    losses = []
    for step in range(STEPS):
        loss, _ = _loss(model, _batch(ds, train[step % len(train)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert np.isfinite(losses).all() and last < 0.7 * first, losses
