"""The import paths users had before the training side moved to pipeline.training still work, and
give the very same objects (not copies that would drift)."""

from __future__ import annotations

import importlib

import pytest

import pipeline.training as training
from pipeline.training import adapters, dataset, preview, schema


@pytest.mark.parametrize("old,new,names", [
    ("pipeline.dataset", dataset,
     ["NemoDataset", "collate_fn", "SCHEMA_VERSIONS", "decode_rle"]),
    ("pipeline.dataset", "pipeline.training.mosaic", ["cell_boxes", "fit_box", "CELL_FITS"]),
    ("pipeline.dataset", "pipeline.training.sampling", ["MOSAIC_NEGATIVES"]),
    ("pipeline.adapters", adapters, list(adapters.__all__)),
    ("pipeline.preview", preview, ["render_preview"]),
])
def test_old_paths_are_the_same_objects(old, new, names):
    before = importlib.import_module(old)
    after = importlib.import_module(new) if isinstance(new, str) else new
    for name in names:
        assert getattr(before, name) is getattr(after, name), name


def test_old_all_lists_are_kept():
    import pipeline.adapters
    import pipeline.dataset

    assert {"SCHEMA_VERSIONS", "NemoDataset", "collate_fn"} <= set(pipeline.dataset.__all__)
    assert set(adapters.__all__) <= set(pipeline.adapters.__all__)
    assert {"ADAPTERS", "get_adapter", "AdaptedDataset", "CrisAdapter", "LavtAdapter",
            "RelaAdapter", "GenericAdapter", "cv2_warp_affine"} <= set(pipeline.adapters.__all__)


def test_package_exposes_the_reader_lazily():
    assert training.NemoDataset is dataset.NemoDataset
    assert training.collate_fn is dataset.collate_fn
    assert training.get_adapter is adapters.get_adapter
    with pytest.raises(AttributeError):
        training.no_such_name  # noqa: B018


def test_one_schema_declaration():
    """The reader's versions are the schema module's (not a second list)."""
    import pipeline.dataset

    assert pipeline.dataset.SCHEMA_VERSIONS is schema.SHARDS_SCHEMA_VERSIONS
    assert schema.SHARDS_SCHEMA_VERSION in schema.SHARDS_SCHEMA_VERSIONS
    assert schema.THUMBNAILS_SCHEMA_VERSION in schema.THUMBNAILS_SCHEMA_VERSIONS
    assert [f.name for f in schema.row_schema()] == list(schema.ROW_COLUMNS)
    assert [f.name for f in schema.thumbnails_schema()] == list(schema.THUMBNAIL_COLUMNS)
