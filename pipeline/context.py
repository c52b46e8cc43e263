"""Old home of the stage context and the shard writer, kept so that stage code written against
it still imports. New code imports the contract from :mod:`pipeline.stage` (and the shard
runtime, which is the runner's, lives in :mod:`pipeline.shards`)."""

from pipeline.shards import ShardWriter
from pipeline.stage import ShardTask, StageContext

__all__ = ["ShardTask", "ShardWriter", "StageContext"]
