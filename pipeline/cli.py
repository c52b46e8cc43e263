"""`nemo-pipe`: run stages and inspect the cache; the stages add their own commands.

The engine's commands live here (run, status, list-stages, path, verify, gc); the commands the
stages package exposes as `COMMANDS` (calibrate, report, audit, preview, demo-data) are mounted
after them through the registry, so this module names no stage module. The common options and
the error handling are declared once in :mod:`pipeline.cli_common`. Heavy libraries (torch,
open_clip, faiss, transformers, pyarrow) load only inside the stages and commands that use
them, so `--help`, `status` and `path` answer quickly.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from pipeline.cli_common import (
    WORK_DIR,
    PipelineOptions,
    UsageErrorsAsErrors,
    command,
    dataset_command,
)
from pipeline.errors import InputError, NemoError
from pipeline.io import human_bytes
from pipeline.registry import load_commands

app = typer.Typer(
    name="nemo-pipe",
    help="Offline, cached preprocessing for referring image segmentation datasets "
         "(RefCOCO, RefCOCO+, G-Ref, gRefCOCO): ingest, CLIP embeddings, NeMo negatives and "
         "mosaics, multi-view expressions, text hard negatives, training shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=UsageErrorsAsErrors,
)


@app.command()
@dataset_command
def run(
    opts: PipelineOptions,
    stage: str = typer.Option(..., "--stage", help="Stage to build (see list-stages)."),
    force: bool = typer.Option(False, "--force", help="Rebuild STAGE even if it is cached "
                                                      "(upstream stays cached)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run and why; "
                                                          "change nothing."),
    verify: bool = typer.Option(False, "--verify",
                                help="Re-hash cached artifacts before reusing them (always: a "
                                     "size check); a corrupt one is rebuilt."),
    wait: bool = typer.Option(True, "--wait/--no-wait",
                              help="If another run holds the artifact's lock: wait for it "
                                   "(default) or exit with status 3."),
    executor: str = typer.Option("local", "--executor",
                                 help="Where shards run: 'local' (this machine) or 'dask' "
                                      "(a dask.distributed cluster)."),
    workers: int = typer.Option(1, "--workers", min=1,
                                help="local: processes for shards (1 = in this process); "
                                     "dask: LocalCluster workers (default 2)."),
    scheduler: str = typer.Option(None, "--scheduler",
                                  help="dask: address of an existing scheduler "
                                       "(tcp://host:8786) instead of a LocalCluster."),
) -> None:
    """Build STAGE and whatever upstream is missing or stale; cached stages do no work."""
    from pipeline.executor import make_executor

    pipe = opts.open(make_executor(executor, workers, scheduler))
    plan = pipe.plan(stage, force, verify)
    for item in plan:
        line = f"{item.name:<16} {item.state:<8} {item.key}"
        typer.echo(line + (f"  ({item.reason})" if item.reason else ""))
    if dry_run:  # what `run` would refuse (a missing library, a preflight) fails here too
        pipe.check(plan)
        return
    if any(i.needs_run for i in plan):
        from pipeline.api import remember_locations

        remember_locations(pipe.env.work_dir, pipe.env.dir_name, pipe.env.locations)
    pipe.execute(plan, wait=wait)
    typer.echo(str(pipe.artifact_dir(stage)))


@app.command()
@dataset_command
def status(
    opts: PipelineOptions,
    stage: str = typer.Option(None, "--stage",
                              help="Show this stage's statistics and report from its manifest."),
) -> None:
    """Every stage under the current config: done / stale / missing / corrupt, key, rows,
    bytes, seconds."""
    pipe = opts.open()
    if stage is not None:
        _stage_report(pipe, opts.dataset, stage)
        return
    rows = pipe.status()
    typer.echo(f"{'stage':<16} {'state':<10} {'key':<16} {'rows':>10} {'bytes':>10} "
               f"{'seconds':>8}")
    notes = {r.note for r in rows}
    shared = notes.pop() if len(notes) == 1 and rows[0].note else None  # said once, below
    for r in rows:
        secs = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        rows_s = str(r.rows) if r.rows is not None else "-"
        note = f"  {r.note}" if r.note and not shared else ""
        typer.echo(f"{r.name:<16} {r.state:<10} {r.key:<16} {rows_s:>10} "
                   f"{human_bytes(r.bytes):>10} {secs:>8}" + note)
    if shared:
        typer.echo(f"every stage: {shared}")


def _stage_report(pipe, dataset: str, stage: str) -> None:
    import json

    from pipeline.api import check_published
    from pipeline.errors import NotPublished

    key = pipe.resolve(stage).key
    if not pipe.store.is_published(pipe.env.dataset, stage, key):
        raise NotPublished(f"{stage} ({key}) for {dataset} is not built under the current config")
    check_published(pipe, stage)
    manifest = pipe.store.manifest(pipe.env.dataset, stage, key)
    typer.echo(f"{stage} {key}  ({pipe.artifact_dir(stage)})")
    typer.echo(json.dumps({"params": manifest["params"], "tables": manifest.get("tables", {}),
                           "stats": manifest.get("stats", {})}, indent=2))
    per_source = manifest.get("stats", {}).get("dropped_per_source")
    if isinstance(per_source, dict) and per_source:
        _drops_table(per_source)


def _drops_table(per_source: dict[str, dict[str, int]]) -> None:
    """Candidates each rule dropped, per source (a hard_negatives manifest's stats)."""
    reasons = list(dict.fromkeys(r for counts in per_source.values() for r in counts))
    width = max(len(s) for s in [*per_source, "total"]) + 2
    heads = [r.removeprefix("dropped_") for r in reasons]
    typer.echo("\ndropped candidates (ranked ahead of a published negative of their source):")
    typer.echo(f"{'source':<{width}}" + "".join(f"{h:>16}" for h in heads))
    for source, counts in [*per_source.items(),
                           ("total", {r: sum(c.get(r, 0) for c in per_source.values())
                                      for r in reasons})]:
        typer.echo(f"{source:<{width}}" + "".join(f"{counts.get(r, 0):>16}" for r in reasons))


@app.command("list-stages")
def list_stages() -> None:
    """The stages, their inputs, config section and tables."""
    from pipeline.registry import load_registry

    reg = load_registry()
    for name in reg.topological():
        cls = reg.get(name)
        # the inputs under the default params: some are switched on by a param (shards reads
        # thumbnails and hard_negatives by default), others only by a non-default one
        inputs = cls().upstream(cls.params_model())
        typer.echo(f"{name} (v{cls.version}): {cls.describe()}")
        typer.echo(f"    inputs: {', '.join(inputs) or '-'}; config section: "
                   f"{cls.config_section()}; tables: {', '.join(cls.tables) or '-'}")


@app.command()
@dataset_command
def path(
    opts: PipelineOptions,
    stage: str = typer.Option(..., "--stage"),
    table: str = typer.Option(None, "--table", help="Print the table's directory instead."),
) -> None:
    """Print the artifact dir (or table dir) the current config resolves to; exit 1 if
    unbuilt, 2 if it is corrupt or `run` would refuse the config."""
    pipe = opts.open()
    cls = pipe.registry.get(stage)
    if table is not None and table not in cls.tables:
        raise NemoError(f"stage {stage!r} has no table {table!r}; it writes "
                        f"{', '.join(cls.tables)}")
    out = pipe.artifact_dir(stage)
    published = pipe.store.is_published(pipe.env.dataset, stage, pipe.resolve(stage).key)
    if published:
        from pipeline.api import check_published

        check_published(pipe, stage)  # a corrupt artifact is an error, not a path to use
    if not published:  # what `run` would refuse is an error here too, not a path to wait for
        pipe.check(pipe.plan(stage))
    typer.echo(str(out / table) if table else str(out))
    if not published:
        typer.secho(f"not published: run `nemo-pipe run --stage {stage} --dataset "
                    f"{opts.dataset}`", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(1)


@app.command()
@command
def verify(
    dataset: str = typer.Option(None, "--dataset", "-d", help="Only this dataset."),
    work_dir: Path = WORK_DIR,
) -> None:
    """Re-check every published artifact's files against its manifest (sha256, rows); mark
    each one with problems corrupt (`status` shows it, the next `run` rebuilds it)."""
    from pipeline.api import check_work_dir, default_work_dir, user_path
    from pipeline.cache import ArtifactStore
    from pipeline.registry import dataset_spec
    from pipeline.verify import verify_store

    work = (user_path(work_dir) or default_work_dir()).absolute()
    check_work_dir(work)
    if not work.is_dir():  # "checked 0 artifact(s)" would pass a mistyped path as verified
        raise InputError(f"work dir {work} does not exist: nothing was built there; check "
                         "--work-dir (or NEMO_WORK_DIR)")
    names: dict[str, str] = {}
    if dataset is not None:
        spec, name = dataset_spec(dataset)
        names, dataset = {spec: name}, spec
    checked, problems = verify_store(ArtifactStore(work, names), dataset)
    for p in problems:
        typer.secho(str(p), fg=typer.colors.RED, err=True)
    typer.echo(f"checked {checked} artifact(s): {len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


@app.command()
@dataset_command
def gc(
    opts: PipelineOptions,
    keep_current: bool = typer.Option(
        False, "--keep-current",
        help="Also remove every published artifact the current config does not resolve to "
             "(old tau/K sweeps); without it only abandoned temp and trash dirs go."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go; remove nothing."),
) -> None:
    """Remove abandoned temp dirs and, with --keep-current, artifacts no current config uses."""
    from pipeline.gc import collect, find_garbage

    pipe = opts.open()
    garbage = find_garbage(pipe, keep_current)
    for g in garbage:
        typer.echo(f"{'would remove' if dry_run else 'remove'} {g.path}  "
                   f"({human_bytes(g.bytes)}; {g.why})")
    total = sum(g.bytes for g in garbage)
    if dry_run:
        typer.echo(f"{len(garbage)} dir(s), {human_bytes(total)} would be freed (dry run)")
    else:
        freed = collect(garbage, pipe.env.work_dir)
        typer.echo(f"freed {human_bytes(freed)} in {len(garbage)} dir(s)")


for _command in load_commands():  # the stages' own commands (calibrate, report, ...)
    app.command()(_command)


def main() -> None:
    # Our own loggers speak at INFO; libraries (open_clip, faiss, dask) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for name in ("pipeline", "stages"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("distributed").setLevel(logging.WARNING)  # it logs every connection
    app()


if __name__ == "__main__":
    main()
