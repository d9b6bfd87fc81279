"""The curate stage's schema: `curate:` in the config (conf/pipeline/curate.yaml sets its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forge.schema import neutral


@dataclass
class CurateConfig:
    """What `forge pipeline=curate` does to each row after normalizing it (forge/stages/curate/).

    Attributes:
        filters: applied in order, each `{name: <filter>, <its thresholds>...}`; a row removed by
            one goes to rejected/ with the filter's name, its reason and the value that failed.
            Names: see forge/stages/curate/filters.py (FILTERS) or README "Curate".
        dedup_exact: drop a row whose content (its id) was already kept in the same shard.
        pools: named subsets, `{name: expression over columns}` (`meta_correctness >= 0.8`,
            `has_tool_calls`, `meta_domain == 'math'`); each is written to pools/<name>/ as well.
        tokenizer: tokenizer for token-count filters (a local dir or Hub id); null = model.tokenizer,
            else model.name_or_path.
        vocab_warmup_rows: datatrove splits words with spaCy inside a memory zone, where every word
            is built again on every row; the words of this many first rows are taught to spaCy once,
            outside a zone, which makes the Gopher/FineWeb filters several times faster with the same
            words out (0 = off). See forge/stages/curate/filters.py `_SpacyVocabWarmup`.
    """

    filters: list[dict[str, Any]] = field(default_factory=list)
    dedup_exact: bool = True
    pools: dict[str, str] = field(default_factory=dict)
    tokenizer: str | None = None
    vocab_warmup_rows: int = neutral(1000)
