"""Resolve keys, plan, and run a stage with whatever upstream is missing or stale.

A stage's key depends only on its params, version, external-input fingerprint and upstream
keys, never on upstream outputs, so the whole DAG's keys are known before anything runs: that is
what makes `status`, `path` and `run --dry-run` cheap and exact.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Generic

from pipeline.cache import ArtifactStore, artifact_key
from pipeline.config import Config
from pipeline.errors import NemoError, StorageError, UpstreamCorrupt
from pipeline.executor import Executor, LocalExecutor
from pipeline.io import MANIFEST, SUCCESS, describe_file, library_versions, write_json
from pipeline.registry import Registry
from pipeline.shards import clear_resume_state, prune_resume_state
from pipeline.stage import P, Params, RunEnv, Stage, StageContext, key_params

# full disk or quota, permissions, read-only mount, a file-size limit (`ulimit -f`, FAT32)
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                  errno.EFBIG}
log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and finished children), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)


@dataclass
class Resolved(Generic[P]):
    """A stage bound to its params and key under the current config (what its run sees as
    `ctx.resolved`)."""

    name: str
    stage: Stage[P]
    params: P
    key: str
    upstream: dict[str, str]
    fingerprint: dict[str, Any]
    shared: dict[str, Params] = field(default_factory=dict)

    def key_params(self) -> dict[str, Any]:
        fields = self.stage.key_fields
        out = key_params(self.params, fields.get(self.stage.section or self.name))
        for section, params in sorted(self.shared.items()):
            out[f"@{section}"] = key_params(params, fields.get(section))
        return out


@dataclass
class PlanItem:
    name: str
    key: str
    state: str  # cached | missing | stale | forced | corrupt
    reason: str = ""

    @property
    def needs_run(self) -> bool:
        return self.state != "cached"


@dataclass
class StatusRow:
    name: str
    state: str  # done | stale | missing | unresolved | corrupt
    key: str = ""
    rows: int | None = None
    bytes: int | None = None
    seconds: float | None = None
    note: str = ""


@dataclass
class Pipeline:
    registry: Registry
    config: Config
    env: RunEnv
    executor: Executor = field(default_factory=LocalExecutor)
    progress: bool = True
    _resolved: dict[str, Resolved[Any]] = field(default_factory=dict)

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.env.work_dir, {self.env.dataset: self.env.dir_name})

    # -- keys ----------------------------------------------------------------------------
    def resolve(self, name: str) -> Resolved[Any]:
        if name in self._resolved:
            return self._resolved[name]
        cls = self.registry.get(name)
        stage = cls()
        params = stage.resolve_params(self.env, self.config.params_for(cls.config_section()))
        upstream = {dep: self.resolve(dep).key for dep in stage.upstream(params)}
        shared = {s: self.config.params_for(s) for s in cls.uses_sections}
        fingerprint = stage.fingerprint(self.env, params)
        r: Resolved[Any] = Resolved(cls.name, stage, params, "", upstream, fingerprint, shared)
        r.key = artifact_key(cls.name, cls.version, r.key_params(), upstream, fingerprint)
        self._resolved[name] = r
        return r

    def inputs_of(self, name: str) -> tuple[str, ...]:
        return tuple(self.resolve(name).upstream)

    def artifact_dir(self, name: str) -> Path:
        r = self.resolve(name)
        return self.store.artifact_dir(self.env.dataset, name, r.key)

    # -- planning ------------------------------------------------------------------------
    def plan(self, target: str, force: bool = False, verify: bool = False) -> list[PlanItem]:
        """What a run would do. A cached artifact whose files are missing or have the wrong
        size (or, with `verify`, the wrong checksum) is `corrupt`: it is rebuilt, not used."""
        from pipeline.verify import quick_check, verify_artifact

        items: list[PlanItem] = []
        for name in self.registry.upstream_order(target, self.inputs_of):
            r = self.resolve(name)
            published = self.store.is_published(self.env.dataset, name, r.key)
            if force and name == target:
                items.append(PlanItem(name, r.key, "forced", "--force"))
            elif published:
                d = self.store.artifact_dir(self.env.dataset, name, r.key)
                problems = verify_artifact(d) if verify else quick_check(d)
                if problems:
                    items.append(PlanItem(name, r.key, "corrupt",
                                          f"{problems[0].file}: {problems[0].what}; rebuilding"))
                else:
                    items.append(PlanItem(name, r.key, "cached"))
            else:
                others = self.store.published_keys(self.env.dataset, name)
                rerun = [i.name for i in items if i.needs_run]
                if others:
                    why = (f"upstream {', '.join(rerun)} will change" if rerun
                           else "params, code version or inputs changed")
                    items.append(PlanItem(name, r.key, "stale", why))
                else:
                    items.append(PlanItem(name, r.key, "missing", "never built"))
        return items

    def status(self) -> list[StatusRow]:
        rows: list[StatusRow] = []
        for name in self.registry.topological():
            try:
                r = self.resolve(name)
            except NemoError as exc:
                rows.append(StatusRow(name, "unresolved", note=str(exc).splitlines()[0]))
                continue
            if self.store.is_published(self.env.dataset, name, r.key):
                from pipeline.verify import quick_check

                d = self.store.artifact_dir(self.env.dataset, name, r.key)
                problems = quick_check(d)
                if problems:
                    p = problems[0]
                    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
                    rows.append(StatusRow(name, "corrupt", r.key,
                                          note=f"{p.file}: {p.what}{more}; `run` rebuilds it"))
                    continue
                m = self.store.manifest(self.env.dataset, name, r.key)
                files = m.get("files", {}).values()
                rows.append(StatusRow(
                    name, "done", r.key,
                    rows=sum(f.get("rows", 0) for f in files),
                    bytes=sum(f["bytes"] for f in files),
                    seconds=m.get("stats", {}).get("seconds"),
                ))
            elif self.store.published_keys(self.env.dataset, name):
                rows.append(StatusRow(name, "stale", r.key, note="published under another key"))
            else:
                rows.append(StatusRow(name, "missing", r.key))
        return rows

    # -- running -------------------------------------------------------------------------
    def run(self, target: str, force: bool = False, wait: bool = True,
            verify: bool = False) -> list[PlanItem]:
        plan = self.plan(target, force, verify)
        self.execute(plan, wait)
        return plan

    def check(self, plan: list[PlanItem]) -> None:
        """Every check a run of `plan` makes before any work (optional libraries, then each
        stage's preflight: splits the dataset lacks, a model that is not there): `path` asks
        them too, so it never prints the artifact of a config that `run` would refuse."""
        for item in plan:
            if item.needs_run:
                r = self.resolve(item.name)
                r.stage.check_libraries(r.params)
                r.stage.preflight(self.env, r.params)

    def execute(self, plan: list[PlanItem], wait: bool = True) -> None:
        """Run the items of a plan that need it, after every stage's checks (`check`)."""
        self.check(plan)  # every check before any work
        rebuilt: set[tuple[str, str]] = set()
        for item in plan:
            if item.needs_run:
                self._execute_healing(item.name, item.state in ("forced", "corrupt"), wait,
                                      rebuilt)

    def _execute_healing(self, name: str, force: bool, wait: bool,
                         rebuilt: set[tuple[str, str]]) -> None:
        """Run a stage; if it finds an upstream file that no longer matches its manifest, mark
        that artifact corrupt, rebuild it (once per run) and run the stage again. The failed
        attempt published nothing and its tmp dir is gone: its shards may hold corrupt data."""
        while True:
            try:
                self._execute(self.resolve(name), force=force, wait=wait)
                return
            except UpstreamCorrupt as exc:
                target = (exc.stage, exc.key)
                known = exc.stage in self.registry.names() and \
                    self.resolve(exc.stage).key == exc.key
                if not known or target in rebuilt:
                    if target in rebuilt:
                        raise UpstreamCorrupt(
                            f"{exc} (still, after rebuilding {exc.stage} {exc.key} in this run: "
                            "check the disk and the work dir for another writer)",
                            stage=exc.stage, key=exc.key, artifact=exc.artifact,
                            file=exc.file, what=exc.what) from None
                    raise
                from pipeline.verify import Problem, mark_corrupt

                rebuilt.add(target)
                artifact = Path(exc.artifact)
                mark_corrupt(artifact, [Problem(artifact, exc.file, exc.what)],
                             by=f"stage {name} reading it")
                log.warning("%s: upstream %s (%s) is corrupt (%s: %s); rebuilding it, then "
                            "%s again", name, exc.stage, exc.key, exc.file, exc.what, name)
                try:
                    self._execute_healing(exc.stage, True, wait, rebuilt)
                except NemoError as inner:
                    if inner.exit_code != 2:
                        raise
                    raise type(inner)(
                        f"{exc.artifact}/{exc.file} {exc.what}, and rebuilding {exc.stage} "
                        f"failed: {inner}") from None

    def _execute(self, r: Resolved[Any], force: bool, wait: bool) -> None:
        try:
            self._execute_locked(r, force, wait)
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            tmp = self.store.tmp_dir(self.env.dataset, r.name, r.key)
            raise StorageError(
                f"{r.name}: cannot write under {tmp.parent} ({exc.strerror}: "
                f"{exc.filename or tmp}); nothing was published. Free space, fix the "
                "permissions or raise the file-size limit (or choose another --work-dir), "
                "then rerun: finished shards are kept and resumed") from exc

    def _execute_locked(self, r: Resolved[Any], force: bool, wait: bool) -> None:
        store, dataset = self.store, self.env.dataset
        with store.lock(dataset, r.name, r.key, wait=wait):
            if store.is_published(dataset, r.name, r.key) and not force:
                return  # a concurrent run finished it while we waited for the lock
            tmp = store.tmp_dir(dataset, r.name, r.key)
            if force:
                shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
            prune_resume_state(tmp, r.key)
            ctx = StageContext(r, self.env, tmp, store, self.executor, self.progress)
            started = time.perf_counter()
            try:
                r.stage.run(ctx)
                ctx.stats["seconds"] = round(time.perf_counter() - started, 3)
                ctx.stats["peak_rss_mb"] = peak_rss_mb()
                self._finalize(r, ctx, tmp)
                store.publish(tmp, store.artifact_dir(dataset, r.name, r.key))
            except StorageError:
                raise  # the disk, not the data: finished shards are kept for the rerun
            except NemoError:
                # Bad input or config (or a corrupt upstream file): nothing worth resuming,
                # and nothing is published.
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def _finalize(self, r: Resolved[Any], ctx: StageContext[Any], tmp: Path) -> None:
        missing = [t for t in r.stage.tables
                   if t not in r.stage.optional_tables and not (tmp / t).exists()]
        if missing:  # a stage bug (or its files went away under it): never publish that
            raise RuntimeError(
                f"{r.name}: declared table(s) {', '.join(missing)} were not written; nothing "
                f"was published (finished shards stay in {tmp} for the rerun)")
        clear_resume_state(tmp)
        for leftover in [p for p in tmp.rglob(".*") if p.is_file() or p.is_symlink()]:
            leftover.unlink()  # a writer's temporary (`.part-*.tmp`), never listed or read
        paths = [p for p in sorted(tmp.rglob("*"))
                 if p.is_file() and not p.name.startswith(("_", "."))]
        # sha256 of every output file: hashlib releases the GIL, so threads hash the parts of a
        # large artifact in parallel (2.8 GiB of negatives: 1.9 s serial on one core)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            described = list(pool.map(describe_file, paths))
        files = {p.relative_to(tmp).as_posix(): info
                 for p, info in zip(paths, described, strict=True)}
        tables: dict[str, int] = {}
        for rel, info in files.items():
            if "/" in rel and "rows" in info:
                t = rel.split("/", 1)[0]
                tables[t] = tables.get(t, 0) + info["rows"]
        manifest = {
            "stage": r.name,
            "version": r.stage.version,
            "dataset": self.env.dataset,
            "key": r.key,
            "params": r.params.model_dump(mode="json"),
            "shared_params": {k: v.model_dump(mode="json") for k, v in r.shared.items()},
            "key_params": r.key_params(),
            "upstream": r.upstream,
            "fingerprint": r.fingerprint,
            "files": files,
            "tables": tables,
            "libraries": library_versions(r.stage.libraries),
            "executor": self.executor.name,
            "stats": ctx.stats,
            **ctx.extra,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(tmp / MANIFEST, manifest)
        (tmp / SUCCESS).write_text("")
