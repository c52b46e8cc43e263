"""A small synthetic dataset in the exact on-disk formats of the REFER releases.

The real RefCOCO / RefCOCO+ / RefCOCOg / gRefCOCO files cannot be downloaded in CI, yet the
pipeline must be exercised on their real formats (pickled refs, COCO instances with polygon,
compressed-RLE and crowd uncompressed-RLE masks, real JPEGs, every split name, multi- and
no-target gRefCOCO refs) and on deliberately broken inputs. `write_demo_data` draws such a
dataset deterministically: same `(n_images, seed)`, same bytes.

Every object is a filled shape whose pixels are exactly its annotation's mask (before JPEG
compression and occlusion by objects drawn later), and every expression is derived from the
annotations (color, category, position, counts, nearest neighbour), so tests can check images,
masks and text against each other. As in the releases, only polygon objects are referred to
(REFER's `getMask` cannot read other targets); compressed-RLE and crowd objects are context.

Modules: `scenes` (categories, shapes, masks, layouts, pixels), `expressions` (the texts of each
release's style), `writer` (refs, split plan, files, broken inputs, `write_demo_data`).
"""

from stages.refer.synthetic.scenes import COCO_CATEGORIES, COLORS
from stages.refer.synthetic.writer import BROKEN_CASES, MIN_IMAGES, DemoSummary, write_demo_data

__all__ = ["BROKEN_CASES", "COCO_CATEGORIES", "COLORS", "MIN_IMAGES", "DemoSummary",
           "write_demo_data"]
