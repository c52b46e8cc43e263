"""Two tiny stages that exercise the engine without any dataset or model.

`numbers` writes the integers [0, n) in shards; `squares` reads them and squares them. Each shard
call appends a line to the file named by TOY_LOG, so tests can count what was (re)computed, and
TOY_FAIL_AT=i makes shard i raise, to simulate a crash; TOY_SHARD_SECONDS makes each shard sleep.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.errors import InputError
from pipeline.stage import Params, ShardTask, ShardWriter, Stage, StageContext, runtime_field


class NumbersParams(Params):
    n: int = Field(20, ge=0)
    per_shard: int = Field(5, ge=1)
    offset: int = 0
    workers: int = runtime_field(1, "not part of the key")
    bad_input: bool = False


def _numbers_shard(payload: dict[str, Any],
                   writer: ShardWriter[NumbersParams]) -> dict[str, Any]:
    import pyarrow as pa

    log = os.environ.get("TOY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"numbers {payload['index']}\n")
    if os.environ.get("TOY_FAIL_AT") == str(payload["index"]):
        raise RuntimeError(f"simulated crash in shard {payload['index']}")
    if os.environ.get("TOY_SHARD_SECONDS"):  # slow shards, for tests of a pool's scheduling
        time.sleep(float(os.environ["TOY_SHARD_SECONDS"]))
    offset = writer.params.offset  # the engine hands every shard the stage's params
    values = list(range(offset + payload["start"], offset + payload["stop"]))
    writer.write_table("numbers", pa.table({"value": pa.array(values, pa.int64())}))
    return {"count": len(values)}


class Numbers(Stage[NumbersParams]):
    """Integers in shards."""

    name = "numbers"
    version = "1"
    tables = ("numbers",)

    def run(self, ctx: StageContext[NumbersParams]) -> None:
        p = ctx.params
        if p.bad_input:
            ctx.write_table("numbers", __import__("pyarrow").table({"value": [1]}))
            raise InputError("toy input is bad")
        tasks = [
            ShardTask(i, {"index": i, "start": s, "stop": min(s + p.per_shard, p.n)})
            for i, s in enumerate(range(0, p.n, p.per_shard))
        ]
        stats = ctx.run_shards(_numbers_shard, tasks)
        ctx.record(total=sum(s["count"] for s in stats))


class SquaresParams(Params):
    power: int = 2


class Squares(Stage[SquaresParams]):
    """Powers of the numbers."""

    name = "squares"
    version = "1"
    inputs = ("numbers",)
    tables = ("squares",)

    def run(self, ctx: StageContext[SquaresParams]) -> None:
        import pyarrow as pa

        log = os.environ.get("TOY_LOG")
        if log:
            with Path(log).open("a") as f:
                f.write("squares\n")
        values = ctx.read_table("numbers", "numbers").column("value").to_pylist()
        p = ctx.params
        ctx.write_table("squares", pa.table({"value": [v ** p.power for v in values]}))


STAGES = [Numbers, Squares]
