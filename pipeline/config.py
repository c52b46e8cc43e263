"""Configuration: YAML file plus `--set a.b=value` overrides, validated by the stages' models.

The config has one section per stage namespace (`ingest`, `embed`, `negatives`, ...). Errors name
the bad key, the bad value and what would be accepted, so a typo never passes silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import ConfigError
from pipeline.registry import Registry
from pipeline.stage import Params


class Config:
    """Validated params per config section."""

    def __init__(self, sections: dict[str, Params]) -> None:
        self.sections = sections

    def params_for(self, section: str) -> Params:
        return self.sections[section]

    def as_dict(self) -> dict[str, Any]:
        return {name: p.model_dump(mode="json") for name, p in self.sections.items()}


def parse_set(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is parsed as YAML (`true`, `[a, b]`)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set embed.model=ViT-B-16")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or any(not p for p in path):
        raise ConfigError(
            f"--set {item!r}: the key must be SECTION.NAME, e.g. mosaic_tables.k=200"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return path, value


def _merge(dst: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = dst
    for i, part in enumerate(path[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{origin}: {'.'.join(path[: i + 1])} is not a section")
        node = nxt
    node[path[-1]] = value


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return data


def _describe_error(err: dict[str, Any], section: str, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in (section, *err["loc"]))
    if err["type"] == "extra_forbidden":
        known = ", ".join(f"{section}.{k}" for k in model.model_fields)
        return f"unknown config key {loc!r} (known keys of section {section!r}: {known})"
    return f"config key {loc!r}: {err['msg']} (got {err.get('input')!r})"


def load_config(
    registry: Registry, config_file: Path | None = None, sets: Sequence[str] = ()
) -> Config:
    """Defaults, then the YAML file, then each `--set` in order."""
    raw: dict[str, Any] = read_config_file(config_file) if config_file else {}
    for item in sets:
        path, value = parse_set(item)
        _merge(raw, path, value, f"--set {item!r}")

    sections = registry.sections()
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(
            f"unknown config section {unknown[0]!r}; known sections: {', '.join(sorted(sections))}"
        )
    out: dict[str, Params] = {}
    for section, cls in sections.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        try:
            out[section] = cls.params_model(**values)
        except ValidationError as exc:
            msgs = [_describe_error(e, section, cls.params_model) for e in exc.errors()]
            raise ConfigError("; ".join(msgs)) from None
    return Config(out)
