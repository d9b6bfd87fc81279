"""Prices, the budget's reservations and its stop line."""

import pytest

from forge.engine.pricing import Budget, BudgetReached, Prices, bytes_upper_bound


def test_cost_counts_cached_prompt_tokens_at_their_own_price() -> None:
    p = Prices(input=2.0, output=8.0, cached_input=0.5)
    assert p.cost(1_000_000, 0, 0) == 2.0 and p.cost(0, 0, 1_000_000) == 8.0
    assert p.cost(1_000, 400, 100) == pytest.approx((600 * 2.0 + 400 * 0.5 + 100 * 8.0) / 1e6)
    assert p.cost(10, 50, 0) == pytest.approx(10 * 0.5 / 1e6)  # never more cached than prompt
    assert p.worst(1_000, 500) == pytest.approx((1_000 * 2.0 + 500 * 8.0) / 1e6)


def test_prices_of_a_model_config() -> None:
    from forge.engine.config import ModelConfig

    assert Prices.of(ModelConfig()) is None
    p = Prices.of(ModelConfig(price_in_per_mtok=0.4, price_out_per_mtok=1.6))
    assert p == Prices(0.4, 1.6, 0.4)  # cached input defaults to the input price
    assert Prices.of(ModelConfig(price_out_per_mtok=1.0, price_cached_in_per_mtok=0.1)) == Prices(0.0, 1.0, 0.1)
    batch = ModelConfig(engine="openai_batch", price_in_per_mtok=0.4, price_out_per_mtok=1.6)
    assert Prices.of(batch) == Prices(0.2, 0.8, 0.2)  # model.batch_discount: half price


def test_reservations_keep_spend_plus_in_flight_under_the_cap() -> None:
    p = Prices(input=1.0, output=1.0, cached_input=1.0)
    b = Budget(1.0, spent_before=0.25)  # $1 cap, a quarter spent by earlier sessions
    held = [b.reserve(p, 100_000, 150_000) for _ in range(3)]  # $0.25 each
    assert b.reserved == pytest.approx(0.75)
    with pytest.raises(BudgetReached, match=r"run.budget_usd=1 reached: \$0.2500 spent, \$0.7500 in flight"):
        b.reserve(p, 1, 0)
    b.settle(held[0], 0.05)  # answered for less than its worst case: room again
    b.release(held[1])  # no answer: nothing billed
    assert b.spent == pytest.approx(0.30) and b.reserved == pytest.approx(0.25)
    b.reserve(p, 200_000, 200_000)
    assert b.spent + b.reserved <= b.limit


def test_bytes_bound_is_an_upper_bound_on_tokens(tokenizer) -> None:
    messages = [{"role": "user", "content": "Explain the water cycle in détail, please ✓"}]
    assert bytes_upper_bound(messages) >= len(tokenizer.encode(tokenizer.render(messages)))
