"""Stage registry and DAG order: the engine's one hook into the stages.

The engine names no stage module. It finds what the stages provide through one module, by
default the `stages` package, which exposes:

- `STAGES`: the Stage classes;
- `COMMANDS`: typer command functions the CLI mounts next to its own (calibrate, report, ...);
- `dataset_spec(dataset) -> (spec, dir name)`: what a `--dataset` value names (optional; by
  default the value is both).

Nothing here knows what a stage computes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

from pipeline.errors import NemoError
from pipeline.stage import Stage

STAGES_MODULE = "stages"

StageClass = type[Stage[Any]]


class Registry:
    def __init__(self, stage_classes: Iterable[StageClass] = ()) -> None:
        self._stages: dict[str, StageClass] = {}
        for cls in stage_classes:
            self.register(cls)

    def register(self, cls: StageClass) -> None:
        if cls.name in self._stages:
            raise ValueError(f"stage {cls.name!r} registered twice")
        self._stages[cls.name] = cls

    def names(self) -> list[str]:
        return list(self._stages)

    def get(self, name: str) -> StageClass:
        try:
            return self._stages[name]
        except KeyError:
            raise NemoError(
                f"unknown stage {name!r}; known stages: {', '.join(self._stages)} "
                "(see `nemo-pipe list-stages`)"
            ) from None

    def sections(self) -> dict[str, StageClass]:
        """Config section -> the stage class whose params model defines it."""
        out: dict[str, StageClass] = {}
        for cls in self._stages.values():
            sec = cls.config_section()
            if sec in out and out[sec].params_model is not cls.params_model:
                raise ValueError(
                    f"stages {out[sec].name!r} and {cls.name!r} share config section {sec!r} "
                    "but declare different params models"
                )
            out.setdefault(sec, cls)
        return out

    def upstream_order(self, target: str,
                       inputs_of: Callable[[str], Sequence[str]] | None = None) -> list[str]:
        """`target` and everything it depends on, dependencies first (a topological order).

        `inputs_of(name)` gives a stage's inputs (default: its declared `inputs`); a pipeline
        passes params-dependent inputs here.
        """
        inputs_of = inputs_of or (lambda name: self.get(name).inputs)
        order: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, path: tuple[str, ...]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                cycle = " -> ".join((*path, name))
                raise ValueError(f"stage dependency cycle: {cycle}")
            state[name] = "visiting"
            for dep in inputs_of(name):
                visit(dep, (*path, name))
            state[name] = "done"
            order.append(name)

        visit(target, ())
        return order

    def topological(self) -> list[str]:
        """Every registered stage, dependencies first."""
        order: list[str] = []
        for name in self._stages:
            for n in self.upstream_order(name):
                if n not in order:
                    order.append(n)
        return order


def _hooks(module: str) -> ModuleType:
    return importlib.import_module(module)


def load_registry(module: str = STAGES_MODULE) -> Registry:
    """The stages `module` exposes as `STAGES`."""
    stages: Sequence[StageClass] = _hooks(module).STAGES
    return Registry(stages)


def load_commands(module: str = STAGES_MODULE) -> list[Callable[..., Any]]:
    """The typer command functions `module` exposes as `COMMANDS` (none if it has none)."""
    return list(getattr(_hooks(module), "COMMANDS", ()))


def dataset_spec(dataset: str, module: str = STAGES_MODULE) -> tuple[str, str]:
    """What a `--dataset` value names, as `module`'s `dataset_spec` reads it: the spec the
    stages get (`RunEnv.dataset`) and the dataset's dir name under the work dir."""
    hook = getattr(_hooks(module), "dataset_spec", None)
    return hook(dataset) if hook is not None else (dataset, dataset)
