"""`nemo-pipe`: run stages, inspect the cache, make demo data.

Heavy libraries (torch, open_clip, faiss, transformers, pyarrow) load only inside the stages and
commands that use them, so `--help`, `status` and `path` answer quickly.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from pipeline.errors import NemoError
from pipeline.io import human_bytes

app = typer.Typer(
    name="nemo-pipe",
    help="Offline, cached preprocessing for referring image segmentation datasets "
         "(RefCOCO, RefCOCO+, G-Ref, gRefCOCO): ingest, CLIP embeddings, NeMo negatives and "
         "mosaics, multi-view expressions, text hard negatives, training shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DATASET = typer.Option(..., "--dataset", "-d",
                       help="refcoco, refcoco+, refcocog-umd, refcocog-google, grefcoco, or the "
                            "path of a data-manifest YAML file.")
WORK_DIR = typer.Option(None, "--work-dir", "-w",
                        help="Artifact root [env NEMO_WORK_DIR; default ./artifacts].")
DATA_ROOT = typer.Option(None, "--data-root",
                         help="REFER data root holding <dataset dir>/refs(...).p and "
                              "instances.json [env NEMO_DATA_ROOT; remembered per dataset].")
IMAGES = typer.Option(None, "--images",
                      help="COCO train2014 images dir [env NEMO_IMAGES; default "
                           "<data-root>/images/train2014 or <data-root>/../images/train2014].")
CONFIG = typer.Option(None, "--config", "-c", help="YAML config file (sections per stage).")
SETS = typer.Option([], "--set", "-s", help="Override a config key, e.g. --set mosaic_tables.k=200 "
                                            "(repeatable; the value is parsed as YAML).")


def _open(dataset, work_dir, config, sets, data_root=None, images=None, executor=None):
    from pipeline.api import open_pipeline

    return open_pipeline(dataset, work_dir, config, sets, data_root, images, executor=executor)


def _fail(exc: NemoError) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(exc.exit_code)


@app.command()
def run(
    stage: str = typer.Option(..., "--stage", help="Stage to build (see list-stages)."),
    dataset: str = DATASET,
    data_root: Path = DATA_ROOT,
    images: Path = IMAGES,
    work_dir: Path = WORK_DIR,
    config: Path = CONFIG,
    sets: list[str] = SETS,
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
    try:
        from pipeline.executor import make_executor

        pipe = _open(dataset, work_dir, config, sets, data_root, images,
                     make_executor(executor, workers, scheduler))
        plan = pipe.plan(stage, force, verify)
        for item in plan:
            line = f"{item.name:<16} {item.state:<8} {item.key}"
            typer.echo(line + (f"  ({item.reason})" if item.reason else ""))
        if dry_run:
            return
        if any(i.needs_run for i in plan):
            from pipeline.api import remember_locations

            remember_locations(pipe.env.work_dir, pipe.env.dir_name, pipe.env.locations)
        pipe.execute(plan, wait=wait)
        typer.echo(str(pipe.artifact_dir(stage)))
    except NemoError as exc:
        _fail(exc)


@app.command()
def status(
    dataset: str = DATASET,
    data_root: Path = DATA_ROOT,
    images: Path = IMAGES,
    work_dir: Path = WORK_DIR,
    config: Path = CONFIG,
    sets: list[str] = SETS,
    stage: str = typer.Option(None, "--stage",
                              help="Show this stage's statistics and report from its manifest."),
) -> None:
    """Every stage under the current config: done / stale / missing, key, rows, bytes, seconds."""
    try:
        pipe = _open(dataset, work_dir, config, sets, data_root, images)
        if stage is not None:
            _stage_report(pipe, dataset, stage)
            return
        rows = pipe.status()
    except NemoError as exc:
        _fail(exc)
    typer.echo(f"{'stage':<16} {'state':<10} {'key':<16} {'rows':>10} {'bytes':>10} "
               f"{'seconds':>8}")
    for r in rows:
        secs = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        rows_s = str(r.rows) if r.rows is not None else "-"
        typer.echo(f"{r.name:<16} {r.state:<10} {r.key:<16} {rows_s:>10} "
                   f"{human_bytes(r.bytes):>10} {secs:>8}" + (f"  {r.note}" if r.note else ""))


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
        typer.echo(f"{name} (v{cls.version}): {cls.describe()}")
        typer.echo(f"    inputs: {', '.join(cls.inputs) or '-'}; config section: "
                   f"{cls.config_section()}; tables: {', '.join(cls.tables) or '-'}")


@app.command()
def path(
    stage: str = typer.Option(..., "--stage"),
    dataset: str = DATASET,
    table: str = typer.Option(None, "--table", help="Print the table's directory instead."),
    data_root: Path = DATA_ROOT,
    images: Path = IMAGES,
    work_dir: Path = WORK_DIR,
    config: Path = CONFIG,
    sets: list[str] = SETS,
) -> None:
    """Print the artifact dir (or table dir) the current config resolves to; exit 1 if unbuilt."""
    try:
        pipe = _open(dataset, work_dir, config, sets, data_root, images)
        cls = pipe.registry.get(stage)
        if table is not None and table not in cls.tables:
            raise NemoError(f"stage {stage!r} has no table {table!r}; it writes "
                            f"{', '.join(cls.tables)}")
        out = pipe.artifact_dir(stage)
        published = pipe.store.is_published(pipe.env.dataset, stage, pipe.resolve(stage).key)
        if published:
            from pipeline.api import check_published

            check_published(pipe, stage)  # a corrupt artifact is an error, not a path to use
    except NemoError as exc:
        _fail(exc)
    typer.echo(str(out / table) if table else str(out))
    if not published:
        typer.secho(f"not published: run `nemo-pipe run --stage {stage} --dataset {dataset}`",
                    err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(1)


@app.command()
def verify(
    dataset: str = typer.Option(None, "--dataset", "-d", help="Only this dataset."),
    work_dir: Path = WORK_DIR,
) -> None:
    """Re-check every published artifact's files against its manifest (sha256, rows); mark
    each one with problems corrupt (`status` shows it, the next `run` rebuilds it)."""
    from pipeline.api import check_work_dir, default_work_dir
    from pipeline.cache import ArtifactStore
    from pipeline.verify import verify_store

    try:
        work = (work_dir or default_work_dir()).absolute()
        check_work_dir(work)
        names: dict[str, str] = {}
        if dataset is not None:
            from stages.refer.manifests import dataset_spec

            spec, name = dataset_spec(dataset)
            names, dataset = {spec: name}, spec
        store = ArtifactStore(work, names)
        checked, problems = verify_store(store, dataset)
    except NemoError as exc:
        _fail(exc)
    for p in problems:
        typer.secho(str(p), fg=typer.colors.RED, err=True)
    typer.echo(f"checked {checked} artifact(s): {len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


@app.command()
def gc(
    dataset: str = DATASET,
    keep_current: bool = typer.Option(
        False, "--keep-current",
        help="Also remove every published artifact the current config does not resolve to "
             "(old tau/K sweeps); without it only abandoned temp and trash dirs go."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go; remove nothing."),
    data_root: Path = DATA_ROOT,
    images: Path = IMAGES,
    work_dir: Path = WORK_DIR,
    config: Path = CONFIG,
    sets: list[str] = SETS,
) -> None:
    """Remove abandoned temp dirs and, with --keep-current, artifacts no current config uses."""
    from pipeline.gc import collect, find_garbage

    try:
        pipe = _open(dataset, work_dir, config, sets, data_root, images)
        garbage = find_garbage(pipe, keep_current)
    except NemoError as exc:
        _fail(exc)
    for g in garbage:
        typer.echo(f"{'would remove' if dry_run else 'remove'} {g.path}  "
                   f"({human_bytes(g.bytes)}; {g.why})")
    total = sum(g.bytes for g in garbage)
    if dry_run:
        typer.echo(f"{len(garbage)} dir(s), {human_bytes(total)} would be freed (dry run)")
    else:
        try:
            freed = collect(garbage, pipe.env.work_dir)
        except NemoError as exc:
            _fail(exc)
        typer.echo(f"freed {human_bytes(freed)} in {len(garbage)} dir(s)")


@app.command()
def calibrate(
    out: Path = typer.Argument(..., help="Output dir: calibration.parquet, .csv and .png."),
    dataset: str = DATASET,
    taus: str = typer.Option("0.6,0.7,0.8,0.85,0.9,null", "--taus",
                             help="Comma-separated tau values; null/off = no filter."),
    ks: str = typer.Option("50,100,200,400,800", "--ks", help="Comma-separated K values."),
    relevance: str = typer.Option("ti", "--relevance", help="ti, ii or both."),
    scale: str = typer.Option("minmax", "--scale", help="minmax or cosine."),
    data_root: Path = DATA_ROOT,
    images: Path = IMAGES,
    work_dir: Path = WORK_DIR,
    config: Path = CONFIG,
    sets: list[str] = SETS,
) -> None:
    """Distractor rate per mosaic and false-positive risk over a tau x K grid, from the
    annotations (no training): pick tau and K from data. Runs `negatives` if needed."""
    from stages.calibrate import calibrate_command, parse_ks, parse_taus

    try:
        path = calibrate_command(dataset, out, parse_taus(taus), parse_ks(ks), relevance, scale,
                                 work_dir, config, sets, data_root, images)
    except NemoError as exc:
        _fail(exc)
    typer.echo(str(path))


@app.command()
def report(
    out: Path = typer.Argument(..., help="HTML file to write (self-contained)."),
    dataset: str = DATASET,
    n_mosaics: int = typer.Option(8, "--n-mosaics", min=0, help="Mosaics in the sample sheet."),
    data_root: Path = DATA_ROOT,
    images: Path = IMAGES,
    work_dir: Path = WORK_DIR,
    config: Path = CONFIG,
    sets: list[str] = SETS,
) -> None:
    """One HTML page: per-stage table (time, memory, key), score histograms with tau, kept
    candidates vs tau and K, hard negatives by kind, a sample of mosaics."""
    from stages.report import report_command

    try:
        path = report_command(dataset, out, work_dir, config, sets, data_root, images,
                              n_mosaics=n_mosaics)
    except NemoError as exc:
        _fail(exc)
    typer.echo(str(path))


@app.command()
def audit(
    dataset: str = DATASET,
    json_out: Path = typer.Option(None, "--json", help="Also write the findings as JSON here."),
    data_root: Path = DATA_ROOT,
    images: Path = IMAGES,
    work_dir: Path = WORK_DIR,
    config: Path = CONFIG,
    sets: list[str] = SETS,
) -> None:
    """Check the published training material (mosaic, hard_negatives, shards) against ingest:
    evaluation sentences or images used for training, positives among negatives, duplicate or
    own-image negatives, K shortfalls. Exit 1 on any finding, 0 when clean."""
    from stages.audit import audit_command, format_audit

    try:
        result = audit_command(dataset, work_dir, config, sets, data_root, images, json_out)
    except NemoError as exc:
        _fail(exc)
    typer.echo(format_audit(result))
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command()
def preview(
    out: Path = typer.Argument(..., help="PNG file to write."),
    dataset: str = DATASET,
    n: int = typer.Option(16, "--n", min=1, help="Samples on the sheet."),
    split: str = typer.Option("train", "--split"),
    seed: int = typer.Option(0, "--seed"),
    data_root: Path = DATA_ROOT,
    images: Path = IMAGES,
    work_dir: Path = WORK_DIR,
    config: Path = CONFIG,
    sets: list[str] = SETS,
) -> None:
    """Contact sheet of training samples: mosaics, target mask, sentence and hard negatives."""
    try:
        pipe = _open(dataset, work_dir, config, sets, data_root, images)
        key = pipe.resolve("shards").key
        if not pipe.store.is_published(pipe.env.dataset, "shards", key):
            raise NemoError(f"shards ({key}) for {dataset} is not built; run `nemo-pipe run "
                            f"--stage shards --dataset {dataset}` first")
        from pipeline.api import check_published

        check_published(pipe, "shards")
        from stages.ingest import data_locations
        from stages.refer.manifests import load_data_manifest

        _, images_dir = data_locations(pipe.env, load_data_manifest(pipe.env.dataset))
    except NemoError as exc:
        _fail(exc)
    from pipeline.preview import render_preview

    try:
        path = render_preview(pipe.artifact_dir("shards"), images_dir, out, split=split, n=n,
                              seed=seed)
    except (ValueError, FileNotFoundError) as exc:
        _fail(NemoError(str(exc)))
    typer.echo(str(path))


@app.command("demo-data")
def demo_data(
    out: Path = typer.Argument(..., help="Output folder (must not exist or be empty)."),
    n_images: int = typer.Option(40, "--n-images", min=12, help="Number of images."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same bytes)."),
) -> None:
    """Write a synthetic REFER-format dataset (all five layouts, real JPEGs, broken cases)."""
    from stages.refer.synthetic import write_demo_data

    try:
        summary = write_demo_data(out, n_images=n_images, seed=seed)
    except FileExistsError as exc:
        _fail(NemoError(str(exc)))
    for name, counts in summary.datasets.items():
        typer.echo(f"{name:<16} " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    typer.echo(f"REFER data root: {summary.refer_root}\nimages: {summary.images_dir}")


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
