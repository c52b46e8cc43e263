"""The artifact key follows every parameter that changes output, for every registered stage.

Generated from the params models, so a new stage or parameter is covered without a new test:
for each field of each config section, a generator derives another valid value from the
field's declared domain (type, bounds, choices; the first candidate the real config loader
accepts), and the keys of every stage are resolved through the engine's own path
(`open_pipeline` -> `Pipeline.resolve`) before and after the change. Expected, from the
registry's declared relations only: an output-affecting field changes the key of exactly the
stages that read its section (as their own or through `uses_sections`) and of everything
downstream of them; a runtime field changes no key at all. Which fields are runtime is itself
pinned by a hand-written list, so turning an output parameter into a runtime one (and so reusing
stale artifacts) fails here.
"""

from __future__ import annotations

import math
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import pytest
import yaml
from pydantic.fields import FieldInfo

from pipeline.api import open_pipeline
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.registry import load_registry

REGISTRY = load_registry()
SECTIONS = {sec: cls.params_model for sec, cls in REGISTRY.sections().items()}
DATASET = "refcoco"

# Fields that change how a stage runs but never what it writes (left out of the key). Written
# by hand on purpose: the models say which fields are runtime, this list says which should be.
RUNTIME = {
    "ingest.strict", "ingest.threads",
    "embed.batch_size", "embed.device", "embed.workers", "embed.strict",
    "negatives.block", "negatives.device", "negatives.selection",
    "mosaic_tables.block", "mosaic_tables.device",
    "multiview.batch_size", "multiview.device", "multiview.memory_gib",
    "multiview.sort_by_length", "multiview.attn_implementation", "multiview.cache_implementation",
    "augment.batch_size", "augment.device",
}

# Stages that read only part of a shared section: the fields of it that change their output.
# By hand, like RUNTIME: the text side keys on the text encoder, not on image decode or the
# other embed stage's sharding; taking a field out of a stage's key fails here.
TEXT_ENCODER = {"model", "pretrained"}
NARROW = {
    "embed_images": {"embed": TEXT_ENCODER | {"fast_decode", "decode", "images_per_shard"}},
    "embed_texts": {"embed": TEXT_ENCODER | {"texts_per_shard"}},
    "clusters": {"embed": TEXT_ENCODER},
    "augment": {"embed": TEXT_ENCODER},
    "hard_negatives": {"embed": TEXT_ENCODER},
}

# A field that only matters under another setting is changed under that setting: tau_ii is
# unused (and kept out of the key) while relevance is `ti`, the default.
CONTEXT = {"mosaic_tables.tau_ii": ["mosaic_tables.relevance=both"]}


# -- another valid value, from the declared domain ------------------------------------------
def _bounds(metadata: list[Any]) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in metadata:
        if isinstance(m, FieldInfo):
            m_lo, m_hi = _bounds(list(m.metadata))
            lo, hi = (m_lo if m_lo is not None else lo), (m_hi if m_hi is not None else hi)
        elif isinstance(m, annotated_types.Ge):
            lo = m.ge
        elif isinstance(m, annotated_types.Le):
            hi = m.le
        elif isinstance(m, annotated_types.Gt):
            lo = m.gt + (1 if isinstance(m.gt, int) else 1e-6)
        elif isinstance(m, annotated_types.Lt):
            hi = m.lt - (1 if isinstance(m.lt, int) else 1e-6)
    return lo, hi


def candidates(annotation: Any, metadata: list[Any], default: Any) -> list[Any]:
    """Values of the declared type near the default, inside its bounds, default excluded."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        return candidates(base, [*metadata, *extra], default)
    if origin in (Union, types.UnionType):
        return [c for a in get_args(annotation) for c in candidates(a, metadata, default)]
    out: list[Any]
    if origin is Literal:
        out = list(get_args(annotation))
    elif annotation is type(None):
        out = [None]
    elif annotation is bool:
        out = [not default] if isinstance(default, bool) else [True, False]
    elif annotation is int:
        lo, hi = _bounds(metadata)
        if type(default) is int:
            out = [default + 1, default - 1, lo, hi]
        else:  # the default is `auto` or null: the smallest allowed integer first
            out = [lo, (lo or 0) + 1, hi] if lo is not None else [0, 1, hi]
        out = [int(v) for v in out if v is not None and (lo is None or v >= lo)
               and (hi is None or v <= hi)]
    elif annotation is float:
        lo, hi = _bounds(metadata)
        base = default if isinstance(default, float) else 0.5
        out = [base + 0.1, base - 0.1, 0.5, lo, hi]
        out = [round(float(v), 6) for v in out if v is not None and math.isfinite(v)
               and (lo is None or v >= lo) and (hi is None or v <= hi)]
    elif annotation is str:
        out = [f"{default}-alt" if isinstance(default, str) and default else "alt",
               "cpu", "cuda:1", "tiny"]
    elif origin is list:
        (item,) = get_args(annotation)
        items = candidates(item, [], None)
        d = list(default) if isinstance(default, list) else []
        out = []
        if len(d) > 1:
            out += [d[:-1], d[1:]]
        out += [d + [i] for i in items if i not in d and i is not None]
    elif origin is dict:
        _, value = get_args(annotation)
        d = dict(default) if isinstance(default, dict) else {}
        out = []
        for k, v in d.items():
            out += [{**d, k: c} for c in candidates(value, [], v)]
    else:
        raise AssertionError(f"no candidate generator for {annotation!r}: extend candidates()")
    return [v for v in out if v != default or type(v) is not type(default)]


def _set(key: str, value: Any) -> str:
    return f"{key}=" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix(
        "...").strip()


def other_valid_value(section: str, name: str, context: list[str]) -> str:
    """The first candidate that the real config loader accepts, as a `--set` item."""
    info = SECTIONS[section].model_fields[name]
    for value in candidates(info.annotation, list(info.metadata), info.default):
        item = _set(f"{section}.{name}", value)
        try:
            cfg = load_config(REGISTRY, sets=[*context, item])
        except ConfigError:
            continue
        if getattr(cfg.params_for(section), name) != info.default:
            return item
    raise AssertionError(f"{section}.{name}: no other valid value among the candidates of its "
                         "declared type; extend candidates()")


# -- keys through the engine ----------------------------------------------------------------
@pytest.fixture(scope="module")
def keys_of(demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("keys") / "work"

    def keys(sets: list[str]) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
        pipe = open_pipeline(DATASET, work, sets=sets, data_root=demo.refer_root,
                             images=demo.images_dir, progress=False)
        resolved = {name: pipe.resolve(name) for name in REGISTRY.names()}
        return ({n: r.key for n, r in resolved.items()},
                {n: tuple(r.upstream) for n, r in resolved.items()})
    return keys


def _reads(stage: str, section: str, name: str) -> bool:
    cls = REGISTRY.get(stage)
    if cls.config_section() != section and section not in cls.uses_sections:
        return False
    return name in NARROW.get(stage, {}).get(section, {name})


def affected(section: str, name: str, upstream: dict[str, tuple[str, ...]]) -> set[str]:
    """Stages whose key must change with output field `section.name`: its readers (own section
    or `uses_sections`, less what NARROW says they ignore), then everything downstream."""
    hit = {n for n in REGISTRY.names() if _reads(n, section, name)}
    for name in REGISTRY.topological():
        if set(upstream[name]) & hit:
            hit.add(name)
    return hit


FIELDS = [f"{sec}.{name}" for sec, model in SECTIONS.items() for name in model.model_fields]


def _is_runtime(key: str) -> bool:
    section, name = key.split(".")
    extra = SECTIONS[section].model_fields[name].json_schema_extra
    return isinstance(extra, dict) and extra.get("affects_output") is False


def test_runtime_fields_are_exactly_the_listed_ones():
    assert {k for k in FIELDS if _is_runtime(k)} == RUNTIME


def test_narrowed_keys_are_exactly_the_listed_ones():
    declared = {n: {sec: set(f) for sec, f in REGISTRY.get(n).key_fields.items()}
                for n in REGISTRY.names() if REGISTRY.get(n).key_fields}
    assert declared == NARROW


def test_the_generator_covers_every_type():
    """Every field of every stage gets another valid value (the generator knows its type)."""
    for key in FIELDS:
        section, name = key.split(".")
        assert other_valid_value(section, name, CONTEXT.get(key, []))


@pytest.mark.parametrize("key", FIELDS)
def test_a_changed_parameter_changes_exactly_the_keys_it_should(keys_of, key):
    section, name = key.split(".")
    context = CONTEXT.get(key, [])
    item = other_valid_value(section, name, context)
    before, _ = keys_of(context)
    after, upstream = keys_of([*context, item])
    changed = {n for n in REGISTRY.names() if before[n] != after[n]}
    expected = set() if key in RUNTIME else affected(section, name, upstream)
    if key not in RUNTIME:
        assert expected, f"{key}: no registered stage reads section {section}"
    assert changed == expected, (item, sorted(changed), sorted(expected))


def test_unused_tau_stays_out_of_the_key(keys_of):
    """The CONTEXT entry is needed: with relevance `ti`, tau_ii is unused and not keyed."""
    base, _ = keys_of([])
    other, _ = keys_of(["mosaic_tables.tau_ii=0.5"])
    assert base == other


def test_generator_values_are_in_the_declared_domain():
    """Spot checks of the generator against hand-picked expectations."""
    assert other_valid_value("mosaic_tables", "k", []) == "mosaic_tables.k=3"
    assert other_valid_value("thumbnails", "quality", []) == "thumbnails.quality=91"
    assert other_valid_value("embed", "device", []) == "embed.device=cpu"
    assert other_valid_value("clusters", "threshold", []) == "clusters.threshold=0.9"
    assert other_valid_value("negatives", "query_splits", []) == (
        "negatives.query_splits=[train, alt]")


def test_demo_keys_resolve_without_data_changes(keys_of):
    """Resolving twice gives the same keys (nothing in the key depends on the clock)."""
    a, _ = keys_of([])
    b, _ = keys_of([])
    assert a == b and len(set(a.values())) == len(a)

