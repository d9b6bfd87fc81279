"""Rollouts: what one sample of a row does (conf/rollout/). A rollout is an async function
`fn(row, generate, ctx)` that may call the engine any number of times; forge caches each call,
quarantines what fails and writes what it returns as columns."""
