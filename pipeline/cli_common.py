"""What every `nemo-pipe` command shares, declared once: the dataset options (`--dataset`,
`--data-root`, `--images`, `--work-dir`, `--config`, `--set`), opening the pipeline they
describe, and turning a :class:`~pipeline.errors.NemoError` or a command-line usage error
into `error: ...` and its exit status.

Both the engine's commands (:mod:`pipeline.cli`) and the ones the stages add (`stages.COMMANDS`)
are written as ``@dataset_command def cmd(opts: PipelineOptions, <own options>)``: the decorator
adds the common options to the signature typer reads and builds `opts` from them. This module
imports no heavy library, so `nemo-pipe --help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from typer.core import TyperGroup

from pipeline.errors import NemoError

if TYPE_CHECKING:
    from pipeline.executor import Executor
    from pipeline.runner import Pipeline

WORK_DIR = typer.Option(None, "--work-dir", "-w",
                        help="Artifact root (env NEMO_WORK_DIR; default ./artifacts).")

# name -> (type, typer option): the common options, in the order `--help` lists them.
_COMMON: dict[str, tuple[Any, Any]] = {
    "dataset": (str, typer.Option(..., "--dataset", "-d",
                                  help="refcoco, refcoco+, refcocog-umd, refcocog-google, "
                                       "grefcoco, or the path of a data-manifest YAML file.")),
    "data_root": (Path, typer.Option(None, "--data-root",
                                     help="REFER data root holding <dataset dir>/refs(...).p "
                                          "and instances.json (env NEMO_DATA_ROOT; remembered "
                                          "per dataset).")),
    "images": (Path, typer.Option(None, "--images",
                                  help="COCO train2014 images dir (env NEMO_IMAGES; default "
                                       "<data-root>/images/train2014 or "
                                       "<data-root>/../images/train2014).")),
    "work_dir": (Path, WORK_DIR),
    "config": (Path, typer.Option(None, "--config", "-c",
                                  help="YAML config file (sections per stage).")),
    "sets": (list[str], typer.Option([], "--set", "-s",
                                     help="Override a config key, e.g. --set mosaic_tables.k=200 "
                                          "(repeatable; the value is parsed as YAML).")),
}


@dataclass(frozen=True)
class PipelineOptions:
    """The common options of a dataset command, as given on the command line."""

    dataset: str
    data_root: Path | None = None
    images: Path | None = None
    work_dir: Path | None = None
    config: Path | None = None
    sets: Sequence[str] = ()

    def open_args(self) -> dict[str, Any]:
        """The keyword arguments `pipeline.api.open_pipeline(dataset, ...)` takes from them
        (the stages' `*_command` functions take the same)."""
        return {"work_dir": self.work_dir, "config": self.config, "sets": self.sets,
                "data_root": self.data_root, "images": self.images}

    def open(self, executor: Executor | None = None) -> Pipeline:
        """The pipeline these options describe."""
        from pipeline.api import open_pipeline

        return open_pipeline(self.dataset, **self.open_args(), executor=executor)


INTERRUPTED = ("interrupted: nothing half-written was published. Run the same command again "
               "to resume (a stage keeps its finished shards and an LLM stage its answers).")


def fail(exc: NemoError) -> NoReturn:
    """Print `error: ...` and exit with the error's status (2 for bad input or config)."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(exc.exit_code)


@contextmanager
def failing() -> Iterator[None]:
    """Turn a NemoError raised inside into `fail`: a message and an exit status, never a
    traceback."""
    try:
        yield
    except NemoError as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.secho(INTERRUPTED, fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None


# click's UsageError (missing or unknown option, bad value, unknown command), reached through
# the public typer.BadParameter: typer >= 0.2x vendors click as typer._click, older typer
# uses click itself, and this finds the class either way.
_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__
                                     if c.__name__ == "UsageError")


def usage_error_line(exc: Any) -> str:
    """A command-line usage error (missing or unknown option, a value out of range) as one
    `error: <command>: <what> (see <command> --help)` line, like every other bad input."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "nemo-pipe"
    what = " ".join(exc.format_message().split()).rstrip(".")
    what = what[:1].lower() + what[1:]
    return f"error: {where}: {what} (see `{where} --help`)"


class UsageErrorsAsErrors(TyperGroup):
    """The `nemo-pipe` group: a usage error, whether in the group's own arguments or in a
    command's (both are parsed inside these two methods), prints `usage_error_line` and exits
    with click's status 2, instead of typer's boxed "Error" panel. `nemo-pipe` alone still
    prints the help."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None,
                     **extra: Any) -> Any:
        with _usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors():
            return super().invoke(ctx)


@contextmanager
def _usage_errors() -> Iterator[None]:
    try:
        yield
    except _USAGE_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `nemo-pipe` alone: typer prints help
            raise
        typer.secho(usage_error_line(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(getattr(exc, "exit_code", 2)) from None


def command(fn: Callable[..., None]) -> Callable[..., None]:
    """A command without the dataset options whose NemoError becomes `error: ...`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        with failing():
            fn(*args, **kwargs)

    return wrapper


def dataset_command(fn: Callable[..., None]) -> Callable[..., None]:
    """Make ``fn(opts: PipelineOptions, **own)`` a typer command function taking the common
    options after its own; a NemoError anywhere in it becomes `error: ...` and its status."""
    sig = inspect.signature(fn, eval_str=True)
    params = list(sig.parameters.values())
    if not params or params[0].name != "opts":
        raise TypeError(f"{fn.__name__}: the first parameter must be `opts: PipelineOptions`")
    own = params[1:]
    clash = {p.name for p in own} & _COMMON.keys()
    if clash:
        raise TypeError(f"{fn.__name__}: {', '.join(sorted(clash))} are common options")
    common = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                annotation=kind) for name, (kind, option) in _COMMON.items()]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> None:
        values = {name: kwargs.pop(name) for name in _COMMON}
        values["sets"] = tuple(values["sets"] or ())
        with failing():
            fn(PipelineOptions(**values), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*own, *common])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*own, *common]}
    return wrapper
