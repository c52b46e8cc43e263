"""The commands the stages add to `nemo-pipe` (mounted by `pipeline.cli` from `stages.COMMANDS`):
calibrate, report, audit, export-refer, preview and demo-data.

Each is a thin typer entry point: the common dataset options and the error handling come from
:func:`pipeline.cli_common.dataset_command`; the work is done by the function it calls, which
is imported on use, so `nemo-pipe --help` loads nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli_common import PipelineOptions, command, dataset_command
from pipeline.errors import NemoError, NotPublished


@dataset_command
def calibrate(
    opts: PipelineOptions,
    out: Path = typer.Argument(..., help="Output dir: calibration.parquet, .csv and .png."),
    taus: str = typer.Option("0.6,0.7,0.8,0.85,0.9,null", "--taus",
                             help="Comma-separated tau values; null/off = no filter."),
    ks: str = typer.Option("50,100,200,400,800", "--ks", help="Comma-separated K values."),
    relevance: str = typer.Option("ti", "--relevance", help="ti, ii or both."),
    scale: str = typer.Option("minmax", "--scale", help="minmax or cosine."),
) -> None:
    """Distractor rate per mosaic and false-positive risk over a tau x K grid, from the
    annotations (no training): pick tau and K from data. Runs `negatives` if needed."""
    from stages.tools.calibrate import calibrate_command, parse_ks, parse_taus

    path = calibrate_command(opts.dataset, out, parse_taus(taus), parse_ks(ks), relevance, scale,
                             **opts.open_args())
    typer.echo(str(path))


@dataset_command
def report(
    opts: PipelineOptions,
    out: Path = typer.Argument(..., help="HTML file to write (self-contained)."),
    n_mosaics: int = typer.Option(8, "--n-mosaics", min=0, help="Mosaics in the sample sheet."),
) -> None:
    """One HTML page: per-stage table (time, memory, key), score histograms with tau, kept
    candidates vs tau and K, hard negatives by kind, a sample of mosaics."""
    from stages.tools.report import report_command

    typer.echo(str(report_command(opts.dataset, out, **opts.open_args(), n_mosaics=n_mosaics)))


@dataset_command
def audit(
    opts: PipelineOptions,
    json_out: Path = typer.Option(None, "--json", help="Also write the findings as JSON here."),
) -> None:
    """Check the published training material (mosaic, hard_negatives, shards) against ingest:
    evaluation sentences or images used for training, positives among negatives, duplicate or
    own-image negatives, K shortfalls. Exit 1 on any finding, 0 when clean."""
    from stages.tools.audit import audit_command, format_audit

    result = audit_command(opts.dataset, **opts.open_args(), json_out=json_out)
    typer.echo(format_audit(result))
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@dataset_command
def export_refer(
    opts: PipelineOptions,
    out: Path = typer.Argument(..., help="Data root to write (OUT/<dataset dir>/ gets the files)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export in OUT."),
) -> None:
    """A REFER copy (refs file, instances.json) whose training refs carry the multi-view
    expressions as extra sentences, for refer.py, the NeMo loader and CRIS's LMDB builder."""
    from stages.tools.export_refer import export_refer_command, format_summary

    typer.echo(format_summary(export_refer_command(opts.dataset, out, **opts.open_args(),
                                                   force=force)))


@dataset_command
def preview(
    opts: PipelineOptions,
    out: Path = typer.Argument(..., help="PNG file to write."),
    n: int = typer.Option(16, "--n", min=1, help="Samples on the sheet."),
    split: str = typer.Option("train", "--split"),
    seed: int = typer.Option(0, "--seed"),
    bands: str = typer.Option("retrieval,random,3x3,square", "--bands",
                              help="Comma-separated sampler settings, one labelled band each: "
                                   "retrieval, random, 3x3, square, mixed."),
) -> None:
    """Contact sheet of training samples, one band per sampler setting (retrieval, random and
    3x3 mosaics, square cells): mosaics, target mask, sentence and hard negatives. Exit 1 if
    the shards are not built."""
    from pipeline.api import check_published
    from stages.ingest import data_locations
    from stages.refer.manifests import load_data_manifest

    pipe = opts.open()
    key = pipe.resolve("shards").key
    if not pipe.store.is_published(pipe.env.dataset, "shards", key):
        raise NotPublished(f"shards ({key}) for {opts.dataset} is not built; run `nemo-pipe "
                           f"run --stage shards --dataset {opts.dataset}` first")
    check_published(pipe, "shards")
    _, images_dir = data_locations(pipe.env, load_data_manifest(pipe.env.dataset))
    from pipeline.training.preview import render_preview

    try:
        path = render_preview(pipe.artifact_dir("shards"), images_dir, out, split=split, n=n,
                              seed=seed, bands=[b.strip() for b in bands.split(",") if b.strip()])
    except (ValueError, FileNotFoundError) as exc:
        raise NemoError(str(exc)) from None
    typer.echo(str(path))


@command
def demo_data(
    out: Path = typer.Argument(..., help="Output folder (must not exist or be empty)."),
    n_images: int = typer.Option(40, "--n-images", min=12, help="Number of images."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed (same seed, same bytes)."),
) -> None:
    """Write a synthetic REFER-format dataset (all five layouts, real JPEGs, broken cases)."""
    from pipeline.io import make_dirs
    from stages.refer.synthetic import write_demo_data

    try:
        make_dirs(out.parent)  # a file in the way is "Not a directory", not "File exists"
        summary = write_demo_data(out, n_images=n_images, seed=seed)
    except OSError as exc:
        if isinstance(exc, FileExistsError) and exc.errno is None:  # the writer's refusal
            raise NemoError(str(exc)) from None
        # OUT, not the file that failed: the writer works in a temp dir beside OUT, whose
        # name means nothing to the user
        raise NemoError(f"{out}: cannot write the demo data ({exc.strerror or exc}); choose a "
                        "writable OUT folder") from None
    for name, counts in summary.datasets.items():
        typer.echo(f"{name:<16} " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    typer.echo(f"REFER data root: {summary.refer_root}\nimages: {summary.images_dir}")


COMMANDS = [calibrate, report, audit, export_refer, preview, demo_data]
"""Mounted on `nemo-pipe` in this order (typer names them: `demo_data` -> `demo-data`)."""
