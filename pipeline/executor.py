"""Where shards run: in this process (default) or in a pool of local processes.

An executor only maps a top-level function over small picklable tasks and yields results as
they finish; publishing, markers and resume stay in the driver, so any executor gets them.
Heavy objects (models, parsed inputs) are built inside the shard function, never pickled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol


class Executor(Protocol):
    name: str

    def map_unordered(
        self, fn: Callable[[Any], Any], tasks: Iterable[Any]
    ) -> Iterator[Any]:
        """Apply `fn` to each task; yield results in completion order."""
        ...


class LocalExecutor:
    """Sequential in this process (workers=1) or a spawn-started process pool."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, int(workers))

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        if self.workers == 1:
            for task in tasks:
                yield fn(task)
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        try:
            futures = [pool.submit(fn, t) for t in tasks]
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            # on a failed shard (or the caller stopping early) the queued shards are dropped,
            # not run to completion and then thrown away: only those already running finish
            pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Shards on a dask.distributed cluster: a LocalCluster of `workers` processes by default,
    or an existing scheduler. Workers must see the work dir (a shared filesystem on a real
    cluster) and have nemo-pipe installed; results come back in completion order and the driver
    publishes, so output is identical to the local executor's.
    """

    name = "dask"

    def __init__(self, scheduler: str | None = None, workers: int = 2) -> None:
        self.scheduler = scheduler
        self.workers = max(1, int(workers))

    def _cluster(self) -> Any:
        from dask.distributed import LocalCluster

        try:  # one worker per GPU when dask-cuda and GPUs are there
            import torch
            from dask_cuda import LocalCUDACluster

            if torch.cuda.device_count() > 0:
                return LocalCUDACluster(dashboard_address=None)
        except ImportError:
            pass
        return LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                            dashboard_address=None)

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        from dask.distributed import Client, as_completed

        tasks = list(tasks)
        if not tasks:
            return
        cluster = None if self.scheduler else self._cluster()
        try:
            client = Client(self.scheduler) if self.scheduler else Client(cluster)
        except (OSError, TimeoutError) as exc:
            if cluster is not None:
                cluster.close()
                raise
            from pipeline.errors import ConfigError

            raise ConfigError(
                f"--scheduler {self.scheduler}: cannot connect ({exc}); check that a dask "
                "scheduler runs there and this machine can reach it, or omit --scheduler "
                "for a local cluster") from None
        try:
            futures = client.map(fn, tasks, pure=False)
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def check_scheduler_address(address: str) -> None:
    """ConfigError unless dask can parse `address` (`tcp://HOST:PORT`, `HOST:PORT`, ...): a
    typo is refused before any stage runs, not as a traceback at the first shard."""
    from distributed.comm.addressing import parse_address, parse_host_port

    from pipeline.errors import ConfigError

    try:
        protocol, location = parse_address(address)
        if protocol in ("tcp", "tls", "ucx"):
            parse_host_port(location)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--scheduler {address!r}: not a dask scheduler address ({exc}); "
                          "give it as tcp://HOST:PORT") from None


def make_executor(kind: str = "local", workers: int = 1, scheduler: str | None = None) -> Executor:
    from pipeline.errors import ConfigError

    if scheduler is not None and kind != "dask":
        raise ConfigError(f"--scheduler {scheduler}: only with --executor dask")
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "dask":
        if scheduler is not None:
            check_scheduler_address(scheduler)
        return DaskExecutor(scheduler, workers if workers > 1 else 2)

    raise ConfigError(f"--executor {kind!r}: expected 'local' or 'dask'")
