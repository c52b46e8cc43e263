"""Configuration: YAML file plus `--set a.b=value` overrides, validated by the stages' models.

The config has one section per stage namespace (`ingest`, `embed`, `negatives`, ...). Errors name
the bad key, the bad value and what would be accepted, so a typo never passes silently.
"""

from __future__ import annotations

import difflib
import logging
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipeline.errors import ConfigError
from pipeline.registry import Registry
from pipeline.stage import INT_MAX, Domain, ParamDomainError, Params

log = logging.getLogger(__name__)


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


_YAML_KINDS = {bool: "boolean", int: "number", float: "number"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    silently, so a config holding `k: 800` and later `k: 200` would run with 200 unnoticed."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self._check_keys(node, deep)
        return super().construct_mapping(node, deep)  # type: ignore[no-untyped-call]

    def _check_keys(self, node: yaml.MappingNode, deep: bool) -> None:
        """Every key a name, none twice, at most one merge (`<<: *anchor`); a merged mapping
        is checked the same way, since the base class only flattens it (its own duplicates
        would otherwise pass unseen). An explicit key over a merged one is what merging is
        for, and stays allowed."""
        seen: dict[Any, int] = {}
        merges = 0
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                merges += 1
                if merges > 1:
                    raise ConfigError(f"config file {self.name}: line {line}: a second merge "
                                      "key (<<) in one section; merge a list (<<: [*a, *b]) "
                                      "or keep one")
                merged = (value_node.value if isinstance(value_node, yaml.SequenceNode)
                          else [value_node])
                for m in merged:
                    if isinstance(m, yaml.MappingNode):
                        self._check_keys(m, deep)
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if not isinstance(key, str):
                raise ConfigError(self._non_string_key(key_node, key, line))
            if key in seen:
                raise ConfigError(f"config file {self.name}: key {key!r} given twice in one "
                                  f"section (lines {seen[key]} and {line}); keep one")
            seen[key] = line

    def _non_string_key(self, key_node: yaml.Node, key: Any, line: int) -> str:
        """Every config key is a name; YAML 1.1 reads `on:`, `no:` or `1:` as a boolean or a
        number (and `? [a, b]` as a list), which would fail later with a traceback."""
        where = f"config file {self.name}: line {line}:"
        if isinstance(key_node, yaml.ScalarNode):
            text = key_node.value
            read_as = ("null" if key is None else
                       f"the {_YAML_KINDS.get(type(key), type(key).__name__)} "
                       f"{format_value(key)}")
            return (f"{where} key {text!r} is not a name (YAML reads it as {read_as}); "
                    f"quote it ('{text}': ...) or correct it")
        kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
        return (f"{where} a {kind} is used as a key; config keys are names: write "
                "`name: value`, quoting the name if needed")


def _seed_mapping_default(raw: dict[str, Any], path: list[str],
                          sections: dict[str, Any]) -> None:
    """Before `--set SECTION.NAME.KEY=V` writes into a mapping-valued param that the config
    has not given yet, start it from the param's default: the override changes one entry of
    the mapping (`hard_negatives.mix.same_image=5` keeps the other sources' quotas) instead of
    replacing the whole mapping with a one-entry one."""
    import copy

    cls = sections.get(path[0])
    info = cls.params_model.model_fields.get(path[1]) if cls is not None else None
    if info is None or info.is_required():
        return
    default = info.get_default(call_default_factory=True)
    section = raw.setdefault(path[0], {})
    if isinstance(default, dict) and isinstance(section, dict) and path[1] not in section:
        section[path[1]] = copy.deepcopy(default)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                          "is it a YAML config file? Save it as UTF-8") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return data


def format_value(value: Any) -> str:
    """A value as it would be written after `--set KEY=` (YAML flow style: true, null, [a, b])."""
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6,
                              sort_keys=False).strip()
    except yaml.YAMLError:
        return repr(value)
    return text.removesuffix("...").strip()


def _number(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bounds(metadata: Sequence[Any]) -> str:
    lo = hi = None
    lo_open = hi_open = False
    for m in metadata:  # flattened; a later bound wins, as in pydantic
        if isinstance(m, annotated_types.Ge):
            lo = m.ge
        elif isinstance(m, annotated_types.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, annotated_types.Le):
            hi = None if m.le == INT_MAX else m.le  # the int32 cap goes without saying
        elif isinstance(m, annotated_types.Lt):
            hi, hi_open = m.lt, True
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{_number(lo)}, {_number(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {_number(lo)}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {_number(hi)}"
    return ""


def _flatten(metadata: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for m in metadata:
        out.extend(_flatten(m.metadata) if isinstance(m, FieldInfo) else [m])
    return out


def describe_domain(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """The allowed values of a params field in words, from its type and constraints:
    `an integer >= 3 or auto`, `a number in [-1, 1]`, `a non-empty list of strings`."""
    metadata = _flatten(metadata)
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        return describe_domain(base, [*metadata, *extra])
    for m in metadata:
        if isinstance(m, Domain):
            return m.text
    if origin in (Union, types.UnionType):
        parts = [describe_domain(a) for a in get_args(annotation)]
        parts = [p for p in parts if p] or ["a value"]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin is Literal:
        values = [format_value(v) for v in get_args(annotation)]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if annotation is type(None):
        return "null"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + _bounds(metadata)
    if annotation is float:
        return "a number" + _bounds(metadata)
    if annotation is str:
        non_empty = any(isinstance(m, annotated_types.MinLen) and m.min_length >= 1
                        for m in metadata)
        return "a non-empty string" if non_empty else "a string"
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        non_empty = any(isinstance(m, annotated_types.MinLen) and m.min_length >= 1
                        for m in metadata)
        return f"a {'non-empty ' if non_empty else ''}list of {_plural(item)}"
    if origin is dict:
        key, value = get_args(annotation) or (Any, Any)
        return f"a mapping of {_plural(key)} to {_plural(value)}"
    return getattr(annotation, "__name__", str(annotation))


def _plural(annotation: Any) -> str:
    """`describe_domain` of a list item or mapping key/value, said of several."""
    one = describe_domain(annotation)
    for single, many in (("one of ", "values from "), ("a non-empty string", "non-empty strings"),
                         ("a string", "strings"), ("an integer", "integers"),
                         ("a number", "numbers")):
        if one.startswith(single):
            return many + one[len(single):]
    return f"values that are each {one}"


def field_domain(model: type[BaseModel], name: str) -> str:
    info = model.model_fields[name]
    return describe_domain(info.annotation, info.metadata)


def _fix_hint(section: str, name: str, model: type[BaseModel]) -> str:
    info = model.model_fields.get(name)
    default = "" if info is None or info.is_required() else (
        f" (the default is {format_value(info.default)})")
    return f"fix the config file or pass --set {section}.{name}=VALUE{default}"


def _describe_errors(errors: list[dict[str, Any]], section: str, model: type[BaseModel],
                     values: dict[str, Any]) -> list[str]:
    """One message per bad key: `section.key: must be <domain> (got <value>); how to fix`.

    Pydantic reports a union field once per member (`k.int`, `k.literal['auto']`); they are
    folded into one message that states the whole domain."""
    msgs: list[str] = []
    done: set[str] = set()
    for err in errors:
        loc = err["loc"]
        ctx_error = (err.get("ctx") or {}).get("error")
        if err["type"] == "extra_forbidden":
            name = str(loc[0])
            known = list(model.model_fields)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {section}.{close[0]}? " if close else ""
            msgs.append(f"unknown config key {f'{section}.{name}'!r} ({hint}known keys of "
                        f"section {section!r}: {', '.join(f'{section}.{k}' for k in known)})")
            continue
        if isinstance(ctx_error, ParamDomainError):
            name = ctx_error.field
            if name not in done:
                done.add(name)
                got = format_value(values.get(name, ctx_error.got))
                msgs.append(f"{section}.{name}: must be {ctx_error.allowed} (got {got}); "
                            + _fix_hint(section, name, model))
            continue
        if not loc:
            msg = str(err["msg"]).removeprefix("Value error, ")
            msgs.append(f"{section}: {msg}; fix the config file or the --set values")
            continue
        name = str(loc[0])
        if name in done:
            continue
        done.add(name)
        got = format_value(values.get(name, err.get("input")))
        if err["type"] in ("value_error", "assertion_error"):
            what = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
            msgs.append(f"{section}.{name}: {what} (got {got}); "
                        + _fix_hint(section, name, model))
        else:
            cap = " (at most 2147483647)" if (err.get("ctx") or {}).get("le") == INT_MAX else ""
            msgs.append(f"{section}.{name}: must be {field_domain(model, name)}{cap} "
                        f"(got {got}); " + _fix_hint(section, name, model))
    return msgs


def apply_renamed_keys(raw: dict[str, Any], registry: Registry) -> None:
    """Move each value given under a renamed key (a stage's `renamed_keys`) to the key that
    replaced it, with a deprecation warning; the two set to different values is an error."""
    for name in registry.names():
        for old, new in registry.get(name).renamed_keys.items():
            old_section, old_name = old.split(".", 1)
            values = raw.get(old_section)
            if not isinstance(values, dict) or old_name not in values:
                continue
            value = values.pop(old_name)
            new_section, new_name = new.split(".", 1)
            target = raw.get(new_section)
            if target is None:
                target = raw[new_section] = {}
            if not isinstance(target, dict):
                raise ConfigError(f"config section {new_section!r} must be a mapping, got "
                                  f"{target!r}")
            if new_name in target and target[new_name] != value:
                raise ConfigError(
                    f"{old} and {new} are both set ({format_value(value)} and "
                    f"{format_value(target[new_name])}); {old} is the old name of {new}: "
                    f"drop it and keep {new}")
            target[new_name] = value
            log.warning("config key %s is deprecated, use %s (took %s=%s)", old, new, new,
                        format_value(value))


def load_config(
    registry: Registry, config_file: Path | None = None, sets: Sequence[str] = ()
) -> Config:
    """Defaults, then the YAML file, then each `--set` in order."""
    raw: dict[str, Any] = read_config_file(config_file) if config_file else {}
    sections = registry.sections()
    for item in sets:
        path, value = parse_set(item)
        if len(path) > 2:
            _seed_mapping_default(raw, path, sections)
        _merge(raw, path, value, f"--set {item!r}")

    apply_renamed_keys(raw, registry)
    # every bad section and key is reported at once (one `error:` line each), so a config
    # with three typos takes one round trip, not three
    msgs = [f"unknown config section {name!r}; known sections: {', '.join(sorted(sections))}"
            for name in sorted(set(raw) - set(sections))]
    out: dict[str, Params] = {}
    for section, cls in sections.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            msgs.append(f"config section {section!r} must be a mapping of keys, got "
                        f"{format_value(values)}; fix the config file")
            continue
        try:
            out[section] = cls.params_model(**values)
        except ValidationError as exc:
            msgs += _describe_errors(exc.errors(), section, cls.params_model, values)
    if msgs:
        raise ConfigError("\nerror: ".join(msgs))
    for name in registry.names():
        registry.get(name).check_config(out)
    return Config(out)
