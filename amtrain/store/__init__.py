"""Token shards: one self-describing binary format for every modality (numpy only)."""

from amtrain.store.dataset import Dataset, DatasetBuilder, Manifest, ShardRecord
from amtrain.store.format import open_shard, read_header, validate_shard, write_shard

__all__ = ["Dataset", "DatasetBuilder", "Manifest", "ShardRecord", "open_shard", "read_header",
           "validate_shard", "write_shard"]
