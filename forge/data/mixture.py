"""A weighted mixture of token sources for training: which source each sample comes from, with a
temperature, a phase schedule (weights that change at given steps, e.g. an annealing phase), data-
parallel ranks, and an exact resume.

The schedule is deterministic: draw g (counted over all ranks) goes to rank g % world_size, and its
source is chosen by smooth weighted round-robin (each source's credit grows by its share every draw;
the source with the most credit is drawn and pays 1). Over any n draws a source's count is within one
of share * n, so shares are exact rather than right on average. Within a source, its k-th draw is
sample perm_e[k % n] of that source, perm_e a seeded permutation for epoch e = k // n.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np


def shares(weights: dict[str, float], temperature: float = 1.0) -> dict[str, float]:
    """p_i proportional to w_i^(1/T), normalized."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    bad = {k: v for k, v in weights.items() if not v >= 0}
    if bad or not any(weights.values()):
        raise ValueError(f"weights must be >= 0 and not all 0 (got {weights})")
    scaled = {k: float(v) ** (1.0 / temperature) for k, v in weights.items()}
    total = sum(scaled.values())
    return {k: v / total for k, v in scaled.items()}


def _batch_size(value: Any) -> int | None:
    """`value` as a batch size (an int >= 1, numpy's ints included), or None if it is not one."""
    if isinstance(value, bool):
        return None
    try:
        n = operator.index(value)
    except TypeError:
        return None
    return n if n >= 1 else None


class MixtureSampler:
    """Yields (source, k) for this rank: the k-th sample drawn from `source` (MixtureDataset maps
    it to a sequence). `phases`: [{"step": s, "weights": {...}}, ...], each starting at training
    step s (a step = `batch_size` samples over all ranks); the first phase is `weights`.

    `state_dict()` is the state after the samples yielded so far; with a DataLoader that prefetches,
    pass `consumed=` (samples this rank's training loop has taken) to get the state after exactly
    those. `load_state_dict(state)` resumes at the next sample."""

    def __init__(
        self,
        weights: dict[str, float],
        temperature: float = 1.0,
        phases: list[dict[str, Any]] | None = None,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        num_samples: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if _batch_size(batch_size) is None:
            raise ValueError(f"batch_size must be an int >= 1 (got {batch_size!r})")
        self.batch_size = batch_size = _batch_size(batch_size)
        self.sources = sorted(set(weights) | {s for p in phases or [] for s in p["weights"]})
        self.temperature = temperature
        schedule = [{"step": 0, "weights": weights}, *sorted(phases or [], key=lambda p: p["step"])]
        self.phases = []  # (first draw, shares as an array over self.sources)
        for p in schedule:
            sh = shares({s: p["weights"].get(s, 0.0) for s in self.sources}, temperature)
            self.phases.append((int(p["step"]) * batch_size, np.array([sh[s] for s in self.sources])))
        self.rank, self.world_size = rank, world_size
        self.num_samples = num_samples  # per rank; None = endless
        self._reset()

    def _reset(self) -> None:
        self.draw = 0  # next global draw
        self.credit = np.zeros(len(self.sources))
        self.counts = np.zeros(len(self.sources), dtype=np.int64)
        self.phase = 0
        self.yielded = 0

    def _next_global(self) -> tuple[int, int, int]:
        """(global draw, source index, k) of the next draw, advancing the schedule."""
        while self.phase + 1 < len(self.phases) and self.draw >= self.phases[self.phase + 1][0]:
            self.phase += 1
            self.credit[:] = 0.0  # a new phase starts its own round-robin
        share = self.phases[self.phase][1]
        self.credit += share
        i = int(np.argmax(self.credit))
        self.credit[i] -= 1.0
        k = int(self.counts[i])
        self.counts[i] += 1
        g = self.draw
        self.draw += 1
        return g, i, k

    def __iter__(self) -> Iterator[tuple[str, int]]:
        while self.num_samples is None or self.yielded < self.num_samples:
            g, i, k = self._next_global()
            if g % self.world_size == self.rank:
                self.yielded += 1
                yield self.sources[i], k

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an endless MixtureSampler has no length; pass num_samples")
        return self.num_samples

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        if consumed is not None and consumed != self.yielded:
            replay = MixtureSampler.__new__(MixtureSampler)
            replay.__dict__.update({k: v for k, v in self.__dict__.items()})
            replay._reset()
            replay._skip(consumed)
            return replay.state_dict()
        return {
            "draw": self.draw,
            "yielded": self.yielded,
            "phase": self.phase,
            "credit": self.credit.tolist(),
            "counts": dict(zip(self.sources, self.counts.tolist(), strict=True)),
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def _skip(self, samples: int) -> None:
        """Advance until this rank has yielded `samples` samples."""
        while self.yielded < samples:
            g, _, _ = self._next_global()
            if g % self.world_size == self.rank:
                self.yielded += 1

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the state's next sample; a state of another sampler (other rank, sources or
        batch_size, or counts that are not its draws) is refused with one line naming what differs."""
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"state of rank {state['rank']}/{state['world_size']} loaded into rank {self.rank}/{self.world_size}"
            )
        theirs = sorted(state["counts"])
        if theirs != self.sources:
            only_state = sorted(set(theirs) - set(self.sources))
            only_here = sorted(set(self.sources) - set(theirs))
            raise ValueError(
                f"state of the sources {theirs} loaded into a sampler of the sources {self.sources} "
                f"(only in the state: {only_state}; only in the sampler: {only_here})"
            )
        size = state.get("batch_size", self.batch_size)  # states saved before it was recorded: trusted
        if _batch_size(size) is None:
            raise ValueError(f"state of batch_size {size!r} refused: batch_size must be an int >= 1")
        if size != self.batch_size:
            raise ValueError(f"state of batch_size {size!r} loaded into a sampler of batch_size {self.batch_size}")
        counts = [state["counts"][s] for s in self.sources]
        if len(state["credit"]) != len(self.sources) or any(c < 0 for c in counts) or sum(counts) != state["draw"]:
            raise ValueError(
                f"state's counts {state['counts']} (credit over {len(state['credit'])} sources) do not add up "
                f"to its draw {state['draw']} over the sources {self.sources}: not a state of this sampler"
            )
        if not 0 <= state["phase"] < len(self.phases) or not 0 <= state["yielded"] <= state["draw"]:
            raise ValueError(f"not a state of this sampler (phase {state['phase']}, draw {state['draw']})")
        self.draw, self.yielded, self.phase = state["draw"], state["yielded"], state["phase"]
        self.credit = np.array(state["credit"], dtype=np.float64)
        self.counts = np.array(counts, dtype=np.int64)


class MixtureDataset:
    """Maps a MixtureSampler's (source, k) to a sequence of that source's dataset: the k-th draw
    of a source of n sequences is sequence perm_e[k % n], perm_e a seeded permutation per epoch
    e = k // n (shuffle=False: in order)."""

    def __init__(self, datasets: dict[str, Any], seed: int = 0, shuffle: bool = True) -> None:
        empty = [name for name, ds in datasets.items() if len(ds) == 0]
        if empty:
            raise ValueError(f"sources with no full sequence: {empty}")
        self.datasets = datasets
        self.seed = seed
        self.shuffle = shuffle
        self._perm: dict[tuple[str, int], np.ndarray] = {}

    def index(self, source: str, k: int) -> int:
        n = len(self.datasets[source])
        epoch, j = divmod(int(k), n)
        if not self.shuffle:
            return j
        key = (source, epoch)
        perm = self._perm.get(key)
        if perm is None:
            if len(self._perm) > 8:
                self._perm.clear()
            rng = np.random.default_rng([self.seed, zlib.crc32(source.encode()), epoch])
            perm = self._perm[key] = rng.permutation(n)
        return int(perm[j])

    def __getitem__(self, item: tuple[str, int]) -> dict[str, Any]:
        source, k = item
        return {**self.datasets[source][self.index(source, k)], "source": source}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_perm": {}}
