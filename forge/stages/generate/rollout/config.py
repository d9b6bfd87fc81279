"""The `rollout:` group's schema (conf/rollout/*.yaml). Knobs of the ready rollouts are fields
here so that `rollout.rounds=2` is checked; each ready rollout says which it reads (a knob that
would have no effect is warned about)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forge.schema import neutral

CHAT_FN = "forge.stages.generate.rollout.library:chat"


@dataclass
class RolloutConfig:
    """What one sample of a row does. `generation.rollouts` is how many independent samples each
    row gets (the `rollout` column); this group is what each sample runs.

    Attributes:
        fn: `module:function`, an `async def fn(row, generate, ctx) -> dict | list[dict]`. The
            module is imported from the working dir first. The default sends the row's prompt once.
        setup: `module:function` called once per task as `setup(ctx)` (sync or async); what it
            returns is `ctx.state`. null: the fn's module's `setup`, if it defines one.
        prompts: the rollout's prompt templates, `{name: text}`; `{field}` is filled in.
        rounds: critique_revise: critique -> revise rounds after the draft.
        turns: multi_turn: assistant turns in the simulated conversation.
        n: best_of_n: samples the judge chooses among (all are kept, with their scores).
        score_min, score_max: the judge's integer scale.
        answer_column: judge: the input column holding the answer to score.
        parse_retries: judge: how many more times the judge is asked when its answer holds no score.
        columns: output column types `{name: string|int64|float64|bool|json|messages|list<string>}`;
            an undeclared column takes the type of its first non-null values and keeps it.
        max_active: samples in progress at once; null = 2 x the in-flight limit, so that step k+1
            of some rows overlaps step k of others and the engine never waits for the rollouts.
        later_steps_first: a free engine slot goes to the sample furthest along (its step k+1
            before another sample's step k), so samples finish sooner and each step is sent while
            the previous one's KV blocks are still in the engine's prefix cache. false: in the
            order the calls were made (each step then runs as a wave over the active samples).
        options: free values for a user's fn (`ctx.options`).
        timeout_s: seconds one sample may take, all its steps together (waits for a free engine
            slot not counted); a sample past it is cancelled (its in-flight requests too) and
            quarantined (stage rollout, the reason names the timeout and the step it was in,
            retryable: a re-run, with a larger limit, retries it, its finished steps replayed from
            the request cache). Not pinned in the run dir. null: no limit.
    """

    fn: str = CHAT_FN
    setup: str | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    rounds: int = 1
    turns: int = 3
    n: int = 4
    score_min: int = 1
    score_max: int = 10
    answer_column: str = "text"
    parse_retries: int = 2
    columns: dict[str, str] = field(default_factory=dict)
    max_active: int | None = neutral(None)
    later_steps_first: bool = neutral(True)
    options: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = neutral(None)
