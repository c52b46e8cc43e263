"""Stage registry and DAG order.

The engine finds stages through a module that exposes `STAGES` (a sequence of Stage classes);
by default that is the `stages` package. Nothing here knows what a stage computes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence

from pipeline.errors import NemoError
from pipeline.stage import Stage


class Registry:
    def __init__(self, stage_classes: Iterable[type[Stage]] = ()) -> None:
        self._stages: dict[str, type[Stage]] = {}
        for cls in stage_classes:
            self.register(cls)

    def register(self, cls: type[Stage]) -> None:
        if cls.name in self._stages:
            raise ValueError(f"stage {cls.name!r} registered twice")
        self._stages[cls.name] = cls

    def names(self) -> list[str]:
        return list(self._stages)

    def get(self, name: str) -> type[Stage]:
        try:
            return self._stages[name]
        except KeyError:
            raise NemoError(
                f"unknown stage {name!r}; known stages: {', '.join(self._stages)} "
                "(see `nemo-pipe list-stages`)"
            ) from None

    def sections(self) -> dict[str, type[Stage]]:
        """Config section -> the stage class whose params model defines it."""
        out: dict[str, type[Stage]] = {}
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


def load_registry(module: str = "stages") -> Registry:
    mod = importlib.import_module(module)
    stages: Sequence[type[Stage]] = mod.STAGES
    return Registry(stages)
