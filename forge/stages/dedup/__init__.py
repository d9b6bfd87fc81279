"""Deduplication (`pipeline=dedup`): exact and MinHash near-dedup across every shard and source
of a run, as a workflow of separately resumable steps (signatures -> buckets -> clusters -> filter)."""
