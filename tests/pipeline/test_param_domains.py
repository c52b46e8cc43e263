"""Every parameter of every registered stage has its domain, checked where the config loads.

Oracles are hand-written: per key, a bad value and the words the error must say (the key, the
allowed range, the value given), and a good value with what it must parse to. A coverage test
makes sure every field of every stage is in both tables, so a new parameter cannot go
unchecked. A generic walk over the params models adds the rule every numeric field obeys (a
boolean is never a number, a boolean field takes no number). The issue's own cases also go
through the CLI as a subprocess: exit 2, the key named, nothing created in the work dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest

from pipeline.config import describe_domain, load_config
from pipeline.errors import ConfigError, InputError, NemoError
from pipeline.registry import load_registry
from pipeline.stage import RunEnv

REPO = Path(__file__).resolve().parents[2]
REGISTRY = load_registry()
SECTIONS = {sec: cls.params_model for sec, cls in REGISTRY.sections().items()}

K_DOMAIN = "mosaic_tables.k: must be an integer >= 3 or one of auto, all"

# -- hand-written tables -------------------------------------------------------------------
# (--set items, words the error must contain). The words name the key, the allowed values and
# the value given, as a user would read them.

BAD: list[tuple[list[str], str]] = [
    # ingest
    (["ingest.strict=1"], "ingest.strict: must be true or false (got 1)"),
    (["ingest.images_per_shard=0"], "ingest.images_per_shard: must be an integer >= 1 (got 0)"),
    (["ingest.images_per_shard=1.5"], "ingest.images_per_shard: must be an integer >= 1 (got 1.5)"),
    (["ingest.threads=-1"], "ingest.threads: must be an integer >= 0 (got -1)"),
    # embed
    (["embed.model="], "embed.model: must be a non-empty string (got '')"),
    (["embed.model=123"], "embed.model: must be a non-empty string (got 123)"),
    (["embed.pretrained="], "embed.pretrained: must be a non-empty string or null (got '')"),
    (["embed.batch_size=-1"], "embed.batch_size: must be an integer >= 0 (got -1)"),
    (["embed.device=gpu"], "embed.device: must be auto, cpu, cuda or cuda:N (got gpu)"),
    (["embed.fast_decode=0"], "embed.fast_decode: must be true or false (got 0)"),
    (["embed.decode=nvjpeg"], "embed.decode: must be one of auto, pil, gpu (got nvjpeg)"),
    (["embed.workers=-2"], "embed.workers: must be an integer >= 0 (got -2)"),
    (["embed.strict=1"], "embed.strict: must be true or false (got 1)"),
    (["embed.images_per_shard=0"], "embed.images_per_shard: must be an integer >= 1 (got 0)"),
    (["embed.texts_per_shard=0"], "embed.texts_per_shard: must be an integer >= 1 (got 0)"),
    # index
    (["index.kind=hnsw"], "index.kind: must be one of flat, ivf, auto (got hnsw)"),
    (["index.nlist=-1"], "index.nlist: must be an integer >= 0 (got -1)"),
    (["index.nprobe=0"], "index.nprobe: must be an integer >= 1 (got 0)"),
    (["index.auto_threshold=0"], "index.auto_threshold: must be an integer >= 1 (got 0)"),
    (["index.recall_k=0"], "index.recall_k: must be an integer >= 1 (got 0)"),
    (["index.recall_sample=0"], "index.recall_sample: must be an integer >= 1 (got 0)"),
    (["index.seed=-1"], "index.seed: must be an integer >= 0 (got -1)"),
    (["index.seed=2147483648"],
     "index.seed: must be an integer >= 0 (at most 2147483647) (got 2147483648)"),
    # negatives
    (["negatives.rank_by=both"], "negatives.rank_by: must be one of ti, ii (got both)"),
    (["negatives.m=2"], "negatives.m: must be an integer >= 3 (got 2)"),
    (["negatives.query_splits=[]"],
     "negatives.query_splits: must be a non-empty list of non-empty strings (got [])"),
    (["negatives.query_splits=train"],
     "negatives.query_splits: must be a non-empty list of non-empty strings (got train)"),
    (["negatives.score_dtype=float64"],
     "negatives.score_dtype: must be one of float32, float16 (got float64)"),
    (["negatives.queries_per_shard=0"],
     "negatives.queries_per_shard: must be an integer >= 1 (got 0)"),
    (["negatives.block=0"], "negatives.block: must be an integer >= 1 (got 0)"),
    (["negatives.device=tpu"], "negatives.device: must be auto, cpu, cuda or cuda:N (got tpu)"),
    (["negatives.selection=fast"],
     "negatives.selection: must be one of auto, sort, topk (got fast)"),
    # mosaic_tables: the issue's cases first
    (["mosaic_tables.tau_ti=-1"],
     "mosaic_tables.tau_ti: must be a number in [0, 1] (mosaic_tables.scale=minmax), "
     "null (no filter) or auto (got -1)"),
    (["mosaic_tables.k=0"], f"{K_DOMAIN} (got 0)"),
    (["mosaic_tables.k=2"], f"{K_DOMAIN} (got 2)"),
    (["mosaic_tables.k=true"], f"{K_DOMAIN} (got true)"),
    (["mosaic_tables.k=-5"], f"{K_DOMAIN} (got -5)"),
    (["mosaic_tables.k=2.5"], f"{K_DOMAIN} (got 2.5)"),
    (["mosaic_tables.k=many"], f"{K_DOMAIN} (got many)"),
    (["mosaic_tables.k=900", "negatives.m=500"],
     "mosaic_tables.k: must be <= negatives.m, the candidates kept per query (got k=900, m=500)"),
    (["mosaic_tables.relevance=neither"],
     "mosaic_tables.relevance: must be one of ti, ii, both (got neither)"),
    (["mosaic_tables.tau_ii=1.5"], "mosaic_tables.tau_ii: must be a number in [0, 1]"),
    (["mosaic_tables.tau_ti=-1.5", "mosaic_tables.scale=cosine"],
     "mosaic_tables.tau_ti: must be a number in [-1, 1] (mosaic_tables.scale=cosine), "
     "null (no filter) or auto (got -1.5)"),
    (["mosaic_tables.tau_ti=true"], "mosaic_tables.tau_ti: must be a number, null or auto "
                                    "(got true)"),
    (["mosaic_tables.tau_ti=.inf"], "mosaic_tables.tau_ti: must be a number, null or auto"),
    (["mosaic_tables.tau_ti=high"], "mosaic_tables.tau_ti: must be a number, null or auto "
                                    "(got high)"),
    (["mosaic_tables.scale=log"], "mosaic_tables.scale: must be one of minmax, cosine (got log)"),
    (["mosaic_tables.block=0"], "mosaic_tables.block: must be an integer >= 1 (got 0)"),
    (["mosaic_tables.device=tpu"],
     "mosaic_tables.device: must be auto, cpu, cuda or cuda:N (got tpu)"),
    # multiview
    (["multiview.backend=openai"],
     "multiview.backend: must be one of hf, vllm, template (got openai)"),
    (["multiview.model="], "multiview.model: must be a non-empty string (got '')"),
    (["multiview.splits=[]"], "multiview.splits: must be a non-empty list of non-empty strings"),
    (["multiview.per_instance=1"], "multiview.per_instance: must be true or false (got 1)"),
    (["multiview.max_attempts=0"], "multiview.max_attempts: must be an integer >= 1 (got 0)"),
    (["multiview.max_new_tokens=15"],
     "multiview.max_new_tokens: must be an integer >= 16 or null (got 15)"),
    (["multiview.images_per_shard=0"],
     "multiview.images_per_shard: must be an integer >= 1 (got 0)"),
    (["multiview.limit_images=-1"], "multiview.limit_images: must be an integer >= 0 (got -1)"),
    (["multiview.batch_size=0"], "multiview.batch_size: must be an integer >= 1 or auto (got 0)"),
    (["multiview.batch_size=max"],
     "multiview.batch_size: must be an integer >= 1 or auto (got max)"),
    (["multiview.device=cuda:x"],
     "multiview.device: must be auto, cpu, cuda or cuda:N (got cuda:x)"),
    (["multiview.memory_gib=0"], "multiview.memory_gib: must be a number > 0 or null (got 0)"),
    (["multiview.sort_by_length=1"], "multiview.sort_by_length: must be true or false (got 1)"),
    (["multiview.attn_implementation=flash"],
     "multiview.attn_implementation: must be one of auto, sdpa, eager, flash_attention_2 "
     "(got flash)"),
    (["multiview.cache_implementation=offloaded"],
     "multiview.cache_implementation: must be one of dynamic, static (got offloaded)"),
    # clusters (a cosine)
    (["clusters.threshold=1.5"], "clusters.threshold: must be a number in [-1, 1] (got 1.5)"),
    (["clusters.threshold=-2"], "clusters.threshold: must be a number in [-1, 1] (got -2)"),
    (["clusters.threshold=true"], "clusters.threshold: must be a number in [-1, 1] (got true)"),
    (["clusters.threshold=.nan"], "clusters.threshold: must be a number in [-1, 1] (got .nan)"),
    (["clusters.include_original=0"],
     "clusters.include_original: must be true or false (got 0)"),
    # augment
    (["augment.backend=gpt"], "augment.backend: must be one of rules, llm (got gpt)"),
    (["augment.model="], "augment.model: must be a non-empty string (got '')"),
    (["augment.kinds=[]"], "augment.kinds: must be a non-empty list of values from swap_color, "
                           "swap_spatial, swap_count, negation, role_reversal (got [])"),
    (["augment.kinds=[shuffle]"], "augment.kinds: must be a non-empty list of values from"),
    (["augment.kinds=[negation, negation]"],
     "augment.kinds: kinds must not repeat (negation given twice)"),
    (["augment.per_kind=0"], "augment.per_kind: must be an integer >= 1 (got 0)"),
    (["augment.splits=[]"], "augment.splits: must be a non-empty list of non-empty strings"),
    (["augment.seed=-1"], "augment.seed: must be an integer >= 0 (got -1)"),
    (["augment.max_attempts=0"], "augment.max_attempts: must be an integer >= 1 (got 0)"),
    (["augment.llm_engine=tgi"], "augment.llm_engine: must be one of hf, vllm (got tgi)"),
    (["augment.sentences_per_shard=0"],
     "augment.sentences_per_shard: must be an integer >= 1 (got 0)"),
    (["augment.batch_size=0"], "augment.batch_size: must be an integer >= 1 (got 0)"),
    (["augment.device=gpu"], "augment.device: must be auto, cpu, cuda or cuda:N (got gpu)"),
    # hard_negatives
    (["hard_negatives.n=0"], "hard_negatives.n: must be an integer >= 1 (got 0)"),
    (["hard_negatives.mix={foo: 1}"], "hard_negatives.mix: unknown sources ['foo']"),
    (["hard_negatives.mix={same_image: -1}"],
     "hard_negatives.mix: must be a mapping of strings to integers >= 0 (got {same_image: -1})"),
    (["hard_negatives.mix={same_image: true}"],
     "hard_negatives.mix: must be a mapping of strings to integers >= 0"),
    (["hard_negatives.mix={}"], "hard_negatives.mix: at least one source needs a quota > 0"),
    (["hard_negatives.same_class=1"], "hard_negatives.same_class: must be true or false (got 1)"),
    (["hard_negatives.class_source=guess"],
     "hard_negatives.class_source: must be one of annotation, extracted (got guess)"),
    (["hard_negatives.search_k=0"], "hard_negatives.search_k: must be an integer >= 1 (got 0)"),
    (["hard_negatives.source_splits=[]"],
     "hard_negatives.source_splits: must be a non-empty list of non-empty strings (got [])"),
    (["hard_negatives.source_splits=['']"], "hard_negatives.source_splits"),
    (["hard_negatives.source_splits=train"], "hard_negatives.source_splits"),
    (["hard_negatives.max_search_k=0"],
     "hard_negatives.max_search_k: must be an integer >= 1 (got 0)"),
    (["hard_negatives.search_k=100", "hard_negatives.max_search_k=50"],
     "hard_negatives.max_search_k: must be an integer >= hard_negatives.search_k (100) (got 50)"),
    # shards
    (["shards.with_hard_negatives=1"],
     "shards.with_hard_negatives: must be true or false (got 1)"),
    (["shards.same_image_negatives=0"],
     "shards.same_image_negatives: must be true or false (got 0)"),
    (["shards.rows_per_part=0"], "shards.rows_per_part: must be an integer >= 1 (got 0)"),
    (["shards.rows_per_group=0"], "shards.rows_per_group: must be an integer >= 1 (got 0)"),
    (["shards.thumbnails=1"], "shards.thumbnails: must be true or false (got 1)"),
    (["shards.hard_negative_pool=0"],
     "shards.hard_negative_pool: must be an integer >= 1 (got 0)"),
    (["shards.with_views=1"], "shards.with_views: must be true or false (got 1)"),
    (["thumbnails.size=15"], "thumbnails.size: must be an integer >= 16 (got 15)"),
    (["thumbnails.quality=0"], "thumbnails.quality: must be an integer in [1, 100] (got 0)"),
    (["thumbnails.quality=101"], "thumbnails.quality: must be an integer in [1, 100] (got 101)"),
    (["thumbnails.images_per_pack=0"],
     "thumbnails.images_per_pack: must be an integer >= 1 (got 0)"),
    # the old shards.* names are checked as the keys they stand for
    (["shards.thumbnail_size=15"], "thumbnails.size: must be an integer >= 16 (got 15)"),
]

# (--set items, "section.key", the value it must load as). Exact types matter: 200 is an int,
# never True; an int given for a float field becomes that float.
GOOD: list[tuple[list[str], str, Any]] = [
    (["ingest.strict=true"], "ingest.strict", True),
    (["ingest.images_per_shard=1"], "ingest.images_per_shard", 1),
    (["ingest.threads=0"], "ingest.threads", 0),
    (["embed.model=tiny"], "embed.model", "tiny"),
    (["embed.pretrained=null"], "embed.pretrained", None),
    (["embed.batch_size=0"], "embed.batch_size", 0),
    (["embed.device=cuda:1"], "embed.device", "cuda:1"),
    (["embed.device=cpu"], "embed.device", "cpu"),
    (["embed.fast_decode=true"], "embed.fast_decode", True),
    (["embed.decode=gpu"], "embed.decode", "gpu"),
    (["embed.workers=4"], "embed.workers", 4),
    (["embed.strict=true"], "embed.strict", True),
    (["embed.images_per_shard=1"], "embed.images_per_shard", 1),
    (["embed.texts_per_shard=7"], "embed.texts_per_shard", 7),
    (["index.kind=auto"], "index.kind", "auto"),
    (["index.nlist=0"], "index.nlist", 0),
    (["index.nprobe=1"], "index.nprobe", 1),
    (["index.auto_threshold=1"], "index.auto_threshold", 1),
    (["index.recall_k=1"], "index.recall_k", 1),
    (["index.recall_sample=1"], "index.recall_sample", 1),
    (["index.seed=2147483647"], "index.seed", 2147483647),
    (["negatives.rank_by=ii"], "negatives.rank_by", "ii"),
    (["negatives.m=3", "mosaic_tables.k=3"], "negatives.m", 3),
    (["negatives.query_splits=[train, val]"], "negatives.query_splits", ["train", "val"]),
    (["negatives.score_dtype=float16"], "negatives.score_dtype", "float16"),
    (["negatives.queries_per_shard=1"], "negatives.queries_per_shard", 1),
    (["negatives.block=1"], "negatives.block", 1),
    (["negatives.device=auto"], "negatives.device", "auto"),
    (["negatives.selection=topk"], "negatives.selection", "topk"),
    (["mosaic_tables.k=200"], "mosaic_tables.k", 200),
    (["mosaic_tables.k=3"], "mosaic_tables.k", 3),
    (["mosaic_tables.k=auto"], "mosaic_tables.k", "auto"),
    (["mosaic_tables.k=all"], "mosaic_tables.k", "all"),
    (["mosaic_tables.block=1"], "mosaic_tables.block", 1),
    (["mosaic_tables.device=cpu"], "mosaic_tables.device", "cpu"),
    (["mosaic_tables.k=800", "negatives.m=800"], "mosaic_tables.k", 800),
    (["mosaic_tables.tau_ti=1"], "mosaic_tables.tau_ti", 1.0),
    (["mosaic_tables.tau_ti=0"], "mosaic_tables.tau_ti", 0.0),
    (["mosaic_tables.tau_ti=null"], "mosaic_tables.tau_ti", None),
    (["mosaic_tables.tau_ti=-1", "mosaic_tables.scale=cosine"], "mosaic_tables.tau_ti", -1.0),
    (["mosaic_tables.tau_ii=0.5"], "mosaic_tables.tau_ii", 0.5),
    (["mosaic_tables.tau_ii=auto"], "mosaic_tables.tau_ii", "auto"),
    (["mosaic_tables.relevance=both"], "mosaic_tables.relevance", "both"),
    (["mosaic_tables.scale=cosine"], "mosaic_tables.scale", "cosine"),
    (["multiview.backend=template"], "multiview.backend", "template"),
    (["multiview.model=tiny"], "multiview.model", "tiny"),
    (["multiview.splits=[val]"], "multiview.splits", ["val"]),
    (["multiview.per_instance=true"], "multiview.per_instance", True),
    (["multiview.max_attempts=1"], "multiview.max_attempts", 1),
    (["multiview.max_new_tokens=16"], "multiview.max_new_tokens", 16),
    (["multiview.max_new_tokens=null"], "multiview.max_new_tokens", None),
    (["multiview.images_per_shard=1"], "multiview.images_per_shard", 1),
    (["multiview.limit_images=0"], "multiview.limit_images", 0),
    (["multiview.batch_size=1"], "multiview.batch_size", 1),
    (["multiview.batch_size=auto"], "multiview.batch_size", "auto"),
    (["multiview.device=cuda"], "multiview.device", "cuda"),
    (["multiview.memory_gib=40"], "multiview.memory_gib", 40.0),
    (["multiview.memory_gib=null"], "multiview.memory_gib", None),
    (["multiview.sort_by_length=false"], "multiview.sort_by_length", False),
    (["multiview.attn_implementation=eager"], "multiview.attn_implementation", "eager"),
    (["multiview.cache_implementation=static"], "multiview.cache_implementation", "static"),
    (["clusters.threshold=1"], "clusters.threshold", 1.0),
    (["clusters.threshold=-1"], "clusters.threshold", -1.0),
    (["clusters.include_original=true"], "clusters.include_original", True),
    (["augment.backend=llm"], "augment.backend", "llm"),
    (["augment.model=gpt2"], "augment.model", "gpt2"),
    (["augment.kinds=[negation]"], "augment.kinds", ["negation"]),
    (["augment.per_kind=1"], "augment.per_kind", 1),
    (["augment.splits=[train, val]"], "augment.splits", ["train", "val"]),
    (["augment.seed=0"], "augment.seed", 0),
    (["augment.max_attempts=1"], "augment.max_attempts", 1),
    (["augment.llm_engine=vllm"], "augment.llm_engine", "vllm"),
    (["augment.sentences_per_shard=1"], "augment.sentences_per_shard", 1),
    (["augment.batch_size=1"], "augment.batch_size", 1),
    (["augment.device=cpu"], "augment.device", "cpu"),
    (["hard_negatives.n=1"], "hard_negatives.n", 1),
    (["hard_negatives.mix={neighbour: 8}"], "hard_negatives.mix",
     {"same_image": 0, "neighbour": 8, "neighbour_same_class": 0, "augmented": 0}),
    (["hard_negatives.same_class=false"], "hard_negatives.same_class", False),
    (["hard_negatives.class_source=extracted"], "hard_negatives.class_source", "extracted"),
    (["hard_negatives.source_splits=[train, val, train]"], "hard_negatives.source_splits",
     ["train", "val"]),
    (["hard_negatives.search_k=8192"], "hard_negatives.search_k", 8192),
    (["hard_negatives.max_search_k=64", "hard_negatives.search_k=64"],
     "hard_negatives.max_search_k", 64),
    (["shards.with_hard_negatives=true"], "shards.with_hard_negatives", True),
    (["shards.same_image_negatives=false"], "shards.same_image_negatives", False),
    (["shards.rows_per_part=1"], "shards.rows_per_part", 1),
    (["shards.rows_per_group=1"], "shards.rows_per_group", 1),
    (["shards.thumbnails=false"], "shards.thumbnails", False),
    (["shards.hard_negative_pool=1"], "shards.hard_negative_pool", 1),
    (["shards.with_views=true"], "shards.with_views", True),
    (["thumbnails.size=16"], "thumbnails.size", 16),
    (["thumbnails.quality=100"], "thumbnails.quality", 100),
    (["thumbnails.images_per_pack=1"], "thumbnails.images_per_pack", 1),
    (["shards.images_per_pack=1"], "thumbnails.images_per_pack", 1),  # the old name
]


def _keys_of(items: list[str]) -> set[str]:
    return {item.split("=", 1)[0] for item in items}


def _error(sets: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(REGISTRY, sets=sets)
    return str(info.value)


# -- the tables ----------------------------------------------------------------------------
def test_tables_cover_every_field_of_every_stage():
    every = {f"{sec}.{name}" for sec, model in SECTIONS.items() for name in model.model_fields}
    bad = set().union(*(_keys_of(sets) for sets, _ in BAD))
    good = {key for _, key, _ in GOOD}
    assert every - bad == set(), "fields without a bad-value row in BAD"
    assert every - good == set(), "fields without a good-value row in GOOD"


@pytest.mark.parametrize(("sets", "words"), BAD, ids=[" ".join(s) for s, _ in BAD])
def test_bad_value_is_an_error_naming_key_and_range(sets, words):
    assert words in _error(sets)


@pytest.mark.parametrize(("sets", "key", "value"), GOOD, ids=[" ".join(s) for s, _, _ in GOOD])
def test_good_value_loads_as_given(sets, key, value):
    section, name = key.split(".")
    got = getattr(load_config(REGISTRY, sets=sets).params_for(section), name)
    assert got == value and type(got) is type(value)


def test_a_config_file_is_checked_the_same_way(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mosaic_tables:\n  k: true\n  tau_ti: -1\n")
    msg = _error_file(cfg)
    assert f"{K_DOMAIN} (got true)" in msg
    cfg.write_text("mosaic_tables:\n  k: 200\n  tau_ti: -1\n")
    assert "mosaic_tables.tau_ti: must be a number in [0, 1]" in _error_file(cfg)
    # a --set after the file fixes it
    fixed = load_config(REGISTRY, cfg, sets=["mosaic_tables.tau_ti=0.5"])
    assert fixed.params_for("mosaic_tables").tau_ti == 0.5


def test_a_dotted_set_changes_one_entry_of_a_mapping(tmp_path):
    """`--set hard_negatives.mix.same_image=5` replaced the whole mix with {same_image: 5},
    silently giving the other sources quota 0. It changes one entry; a whole mapping given
    as the value still replaces, and a file's mapping is the base a dotted --set edits."""
    default = {"same_image": 2, "neighbour": 2, "neighbour_same_class": 2, "augmented": 2}
    one = load_config(REGISTRY, sets=["hard_negatives.mix.same_image=5"])
    assert one.params_for("hard_negatives").mix == {**default, "same_image": 5}
    whole = load_config(REGISTRY, sets=["hard_negatives.mix={same_image: 5}"])
    zero = dict.fromkeys(default, 0)  # a source the mapping leaves out gets no places
    assert whole.params_for("hard_negatives").mix == {**zero, "same_image": 5}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("hard_negatives:\n  mix: {neighbour: 4}\n")
    both = load_config(REGISTRY, cfg, sets=["hard_negatives.mix.augmented=1"])
    assert both.params_for("hard_negatives").mix == {**zero, "neighbour": 4, "augmented": 1}
    # the default of the model itself is untouched for the next load
    assert load_config(REGISTRY).params_for("hard_negatives").mix == default


def test_a_key_given_twice_in_a_config_file_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mosaic_tables:\n  k: 800\n  tau_ti: 0.5\n  k: 200\n")
    msg = _error_file(cfg)
    assert f"config file {cfg}: key 'k' given twice in one section (lines 2 and 4)" in msg
    cfg.write_text("mosaic_tables:\n  k: 800\nmosaic_tables:\n  k: 200\n")
    assert "key 'mosaic_tables' given twice" in _error_file(cfg)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\xff\xfe mosaic_tables: {k: 200}")
    msg = _error_file(cfg)
    assert msg.startswith(f"config file {cfg}: not UTF-8 text (byte 0") and "UTF-8" in msg


def _error_file(cfg: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(REGISTRY, cfg)
    return str(info.value)


def test_each_bad_key_gets_its_own_line_and_a_fix():
    msg = _error(["mosaic_tables.k=2", "mosaic_tables.relevance=x"])
    lines = msg.splitlines()  # the CLI prints "error: " before the first line
    assert len(lines) == 2
    assert lines[0].startswith("mosaic_tables.relevance: must be one of ti, ii, both (got x)")
    assert lines[1].startswith(f"error: {K_DOMAIN} (got 2)")
    # how to fix: the --set to use and the default
    assert "pass --set mosaic_tables.k=VALUE (the default is auto)" in msg


def test_bad_keys_of_every_section_are_reported_together(tmp_path):
    """Only the first section with a bad key was reported: a config with three typos in three
    sections took three round trips. Every bad section and key is a line of one error."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("bogus: {}\nembed: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(REGISTRY, cfg, sets=["mosaic_tables.k=2", "index.kind=x",
                                         "ingest.threads=-1"])
    lines = str(info.value).splitlines()
    assert len(lines) == 5, lines
    assert all(x.startswith("error: ") for x in lines[1:])
    for words in ("unknown config section 'bogus'", "config section 'embed' must be a mapping",
                  "ingest.threads: must be an integer >= 0 (got -1)",
                  "index.kind: must be one of flat, ivf, auto (got x)", f"{K_DOMAIN} (got 2)"):
        assert sum(words in x for x in lines) == 1, words


@pytest.mark.parametrize(("text", "words"), [
    ("mosaic_tables:\n  on: 3\n",
     "line 2: key 'on' is not a name (YAML reads it as the boolean true); quote it ('on': ...)"),
    ("1: {}\nfoo: {}\n", "line 1: key '1' is not a name (YAML reads it as the number 1)"),
    ("mosaic_tables:\n  k: 200\n  ? [a, b]\n  : 3\n", "line 3: a list is used as a key"),
])
def test_a_config_key_that_is_not_a_string_is_a_config_error(tmp_path, text, words):
    """YAML 1.1 reads `on:` as true and `1:` as a number: the params model then failed with a
    TypeError traceback (keywords must be strings; sorting str and int section names; a list
    key is unhashable)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    msg = _error_file(cfg)
    assert msg.startswith(f"config file {cfg}: line ") and words in msg


def test_a_yaml_merge_key_is_not_mistaken_for_a_bad_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mosaic_tables: &m\n  k: 200\nnegatives:\n  <<: {m: 400}\n  m: 512\n")
    assert load_config(REGISTRY, cfg).params_for("negatives").m == 512


@pytest.mark.parametrize("text, words", [
    ("mosaic_tables:\n  <<: &b {k: 100, k: 200}\n", "key 'k' given twice"),
    ("a: &a {k: 100}\nb: &b {k: 200}\nmosaic_tables:\n  <<: *a\n  <<: *b\n",
     "a second merge key"),
    ("a: &a {k: 100, k: 300}\nmosaic_tables:\n  <<: [*a]\n", "key 'k' given twice"),
])
def test_a_merge_key_hides_no_duplicate(tmp_path, text, words):
    """A duplicate inside a merged mapping, or a second `<<` (the last silently won), passed
    the duplicate-key check: the base loader only flattens merged mappings."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    msg = _error_file(cfg)
    assert msg.startswith(f"config file {cfg}") and words in msg, msg


def test_unknown_key_suggests_the_close_one():
    msg = _error(["mosaic_tables.kk=200"])
    assert "unknown config key 'mosaic_tables.kk'" in msg and "did you mean mosaic_tables.k?" in msg


# -- generic rules, walked from the params models -------------------------------------------
def _leaf_types(annotation: Any) -> set[Any]:
    """The scalar types a field accepts (int, float, bool, str, None, Literal values)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return set().union(*(_leaf_types(a) for a in get_args(annotation)))
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if origin is Literal:
        return {"literal"}
    if origin in (list, dict):
        return {origin}
    return {annotation}


FIELDS = [(sec, name, info) for sec, model in SECTIONS.items()
          for name, info in model.model_fields.items()]
NUMERIC = [(s, n) for s, n, i in FIELDS if _leaf_types(i.annotation) & {int, float}]
BOOLEAN = [(s, n) for s, n, i in FIELDS if _leaf_types(i.annotation) == {bool}]
INT_ONLY = [(s, n) for s, n, i in FIELDS
            if int in _leaf_types(i.annotation) and float not in _leaf_types(i.annotation)]


def test_the_walk_found_the_fields():
    """Guards the walk itself against finding nothing (a hand count of today's fields)."""
    assert ("mosaic_tables", "k") in NUMERIC and ("mosaic_tables", "tau_ti") in NUMERIC
    assert ("clusters", "threshold") in NUMERIC and ("thumbnails", "quality") in NUMERIC
    assert ("shards", "thumbnails") in BOOLEAN and ("shards", "thumbnails") not in NUMERIC
    assert len(NUMERIC) >= 37 and len(BOOLEAN) >= 9  # counted by hand in stages/*.py


@pytest.mark.parametrize(("section", "name"), NUMERIC, ids=[f"{s}.{n}" for s, n in NUMERIC])
@pytest.mark.parametrize("value", ["true", "false"])
def test_a_numeric_field_rejects_a_boolean(section, name, value):
    msg = _error([f"{section}.{name}={value}"])
    assert f"{section}.{name}: must be " in msg and f"(got {value})" in msg


@pytest.mark.parametrize(("section", "name"), BOOLEAN, ids=[f"{s}.{n}" for s, n in BOOLEAN])
@pytest.mark.parametrize("value", ["1", "0"])
def test_a_boolean_field_rejects_a_number(section, name, value):
    msg = _error([f"{section}.{name}={value}"])
    assert f"{section}.{name}: must be true or false (got {value})" in msg


@pytest.mark.parametrize(("section", "name"), INT_ONLY, ids=[f"{s}.{n}" for s, n in INT_ONLY])
def test_an_integer_field_rejects_a_fraction_and_an_overflow(section, name):
    assert f"{section}.{name}: must be " in _error([f"{section}.{name}=3.5"])
    assert f"{section}.{name}: must be " in _error([f"{section}.{name}={2**31}"])


def test_describe_domain_in_words():
    from pydantic import Field

    assert describe_domain(bool) == "true or false"
    assert describe_domain(Annotated[int, Field(ge=3)] | Literal["auto"]) == (
        "an integer >= 3 or auto")
    assert describe_domain(Annotated[float, Field(ge=-1, le=1)]) == "a number in [-1, 1]"
    assert describe_domain(float | None | Literal["auto"]) == "a number, null or auto"
    assert describe_domain(Annotated[list[str], Field(min_length=1)]) == (
        "a non-empty list of strings")


# -- K and tau from the data manifest -------------------------------------------------------
def test_auto_resolves_to_the_manifest_values_in_their_domain():
    from stages.mosaic_tables import MosaicTables

    cfg = load_config(REGISTRY, sets=["mosaic_tables.relevance=both"])
    env = RunEnv(work_dir=Path("/nonexistent"), dataset="refcocog-google")
    p = MosaicTables().resolve_params(env, cfg.params_for("mosaic_tables"))
    # data_manifests/refcocog-google.yaml: k 200, tau 0.75 (NeMo's G-Ref values)
    assert (p.k, p.tau_ti, p.tau_ii) == (200, 0.75, 0.75)
    assert type(p.k) is int


def _manifest(tmp_path: Path, defaults: str) -> str:
    text = (REPO / "data_manifests" / "refcoco.yaml").read_text()
    head = text[: text.index("defaults:")]
    tail = text[text.index("citation:"):]
    path = tmp_path / "custom.yaml"
    path.write_text(head + "defaults:\n" + defaults + tail)
    return str(path)


@pytest.mark.parametrize(("defaults", "words"), [
    ("  k: 2\n  tau: 0.85\n  gamma: 0.6\n", "defaults.k"),
    ("  k: true\n  tau: 0.85\n  gamma: 0.6\n", "defaults.k"),
    ("  k: 800\n  tau: -1\n  gamma: 0.6\n", "defaults.tau"),
    ("  k: 800\n  tau: 1.5\n  gamma: 0.6\n", "defaults.tau"),
    ("  k: 800\n  tau: 0.85\n  gamma: 2\n", "defaults.gamma"),
])
def test_data_manifest_defaults_have_the_same_domains(tmp_path, defaults, words):
    from stages.refer.manifests import load_data_manifest

    path = _manifest(tmp_path, defaults)
    with pytest.raises(InputError) as info:
        load_data_manifest(path)
    assert words in str(info.value) and path in str(info.value)
    # the key, the rule and the value in words, not pydantic's dump and documentation URLs
    assert "pydantic.dev" not in str(info.value) and "input_value" not in str(info.value)
    assert f"{words}: input should be" in str(info.value) and "(got " in str(info.value)


def test_shipped_manifests_hold_valid_defaults():
    from stages.refer.manifests import known_datasets, load_data_manifest

    for name in known_datasets():
        d = load_data_manifest(name).defaults
        assert type(d.k) is int and d.k >= 3 and 0.0 <= d.tau <= 1.0 and 0 <= d.gamma <= 1


def test_a_manifest_key_nothing_reads_is_refused(tmp_path):
    """`positional_words_allowed` (false for RefCOCO+) was accepted and never read: the
    positional constraint acts only on sentences that name a position, so a dataset whose
    annotators avoided them needs no switch. A manifest still giving it is told so."""
    from stages.refer.manifests import DataManifest, load_data_manifest

    assert "positional_words_allowed" not in DataManifest.model_fields
    path = _manifest(tmp_path, "  k: 800\n  tau: 0.85\n  gamma: 0.6\n")
    Path(path).write_text(Path(path).read_text() + "positional_words_allowed: false\n")
    with pytest.raises(InputError, match="positional_words_allowed: extra inputs are not "
                                         "permitted"):
        load_data_manifest(path)


def test_calibrate_rejects_a_tau_outside_its_scale():
    from stages.tools.calibrate import _grid_params

    with pytest.raises(NemoError, match=r"tau -1 is outside \[0, 1\], the range of scale minmax"):
        _grid_params([-1.0], [3], "ti", "minmax")
    assert len(_grid_params([-1.0, None], [2, 3], "ti", "cosine")) == 4  # a sweep may try K=2


# -- through the CLI, as a user types it ----------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


ISSUE_CASES = [
    ("mosaic_tables.tau_ti=-1", "mosaic_tables.tau_ti: must be a number in [0, 1]"),
    ("mosaic_tables.k=0", f"{K_DOMAIN} (got 0)"),
    ("mosaic_tables.k=2", f"{K_DOMAIN} (got 2)"),
    ("mosaic_tables.k=true", f"{K_DOMAIN} (got true)"),
    ("mosaic_tables.k=-5", f"{K_DOMAIN} (got -5)"),
]


def test_cli_issue_cases_exit_2_and_create_nothing(demo, tmp_path):
    common = ["--dataset", "refcoco", "--data-root", str(demo.refer_root),
              "--images", str(demo.images_dir)]
    for item, words in ISSUE_CASES:
        work = tmp_path / item.replace("=", "_")
        res = _cli("run", "--stage", "mosaic_tables", "--work-dir", str(work), *common,
                   "--set", item)
        assert res.returncode == 2, (item, res.stdout, res.stderr)
        assert f"error: {words}" in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not work.exists(), item  # nothing created in the work dir
    # the control: a value in the domain passes the config (a dry run plans the stage; it
    # makes the run's checks too, so the model must be one that is there)
    ok = _cli("run", "--stage", "mosaic_tables", "--dry-run", "--work-dir",
              str(tmp_path / "ok"), *common, "--set", "mosaic_tables.k=200",
              "--set", "embed.model=tiny")
    assert ok.returncode == 0, ok.stderr
    assert any(ln.startswith("mosaic_tables ") for ln in ok.stdout.splitlines())


def test_cli_status_and_path_refuse_a_bad_config_too(tmp_path):
    work = tmp_path / "w"
    for cmd in (["status"], ["path", "--stage", "shards"]):
        res = _cli(*cmd, "--dataset", "refcoco", "--work-dir", str(work),
                   "--set", "thumbnails.quality=0")
        assert res.returncode == 2, res.stderr
        assert "thumbnails.quality: must be an integer in [1, 100] (got 0)" in res.stderr
        assert not work.exists()
