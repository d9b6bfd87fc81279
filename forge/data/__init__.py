"""Training-time readers of forge's tokenized output, importable without Hydra or an engine:

    from forge.data import TokenShards, MixtureSampler, MixtureDataset

(This folder also holds forge's bundled sample data files.)"""

from forge.data.mixture import MixtureDataset, MixtureSampler, shares
from forge.data.shards import IGNORE, TokenShards, read_index, read_megatron_index

__all__ = ["IGNORE", "MixtureDataset", "MixtureSampler", "TokenShards", "read_index", "read_megatron_index", "shares"]
