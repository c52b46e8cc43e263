"""index: FAISS inner-product indices over the image and text embeddings.

Vectors are L2-normalised, so inner product is cosine. `flat` is exact; `ivf` trades recall for
speed on large pools, and its recall@K against exact search on a sample is recorded in the
manifest so the trade is visible. `auto` picks flat below `auto_threshold` vectors, like
autofaiss's size-based choice. Row i of `<name>.faiss` is row i of the `<name>_ids` table.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.stage import Count, NonNegInt, Params, Seed, Stage, StageContext
from stages.embed import embeddings_matrix

if TYPE_CHECKING:
    import numpy as np


class IndexParams(Params):
    kind: Literal["flat", "ivf", "auto"] = Field("flat", description="flat (exact), ivf, auto")
    nlist: NonNegInt = Field(0, description="IVF lists (0: about 4 sqrt(n))")
    nprobe: Count = Field(16, description="IVF lists searched per query")
    auto_threshold: Count = Field(200_000, description="auto: ivf from this many vectors")
    recall_k: Count = Field(10, description="K of the recall@K check of an IVF index")
    recall_sample: Count = Field(1000, description="queries in the recall check")
    seed: Seed = Field(0, description="seed of the IVF training and the recall sample")


def choose_kind(params: IndexParams, n: int) -> str:
    if params.kind != "auto":
        return params.kind
    return "ivf" if n >= params.auto_threshold else "flat"


def build_index(vectors: np.ndarray, params: IndexParams) -> tuple[Any, dict[str, Any]]:
    """A CPU faiss index of `vectors` (built on GPU when faiss has one) and its description."""
    import faiss
    import numpy as np

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    kind = choose_kind(params, n)
    info: dict[str, Any] = {"kind": kind, "n": n, "dim": d}
    if kind == "flat" or n < 2:
        index = faiss.IndexFlatIP(d)
        index.add(x)
        info["kind"] = "flat"
        return index, info
    nlist = params.nlist or max(1, int(4 * math.sqrt(n)))
    nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants ~39 training points per list
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = params.seed
    if faiss.get_num_gpus() > 0:
        gpu = faiss.index_cpu_to_all_gpus(index)
        gpu.train(x)
        gpu.add(x)
        index = faiss.index_gpu_to_cpu(gpu)
        info["built_on"] = "gpu"
    else:
        index.train(x)
        index.add(x)
        info["built_on"] = "cpu"
    index.nprobe = min(params.nprobe, nlist)
    info.update(nlist=nlist, nprobe=index.nprobe)
    info[f"recall_at_{params.recall_k}"] = ivf_recall(index, x, params)
    return index, info


def ivf_recall(index: Any, x: np.ndarray, params: IndexParams) -> float:
    """Mean recall@K of `index` against exact search, on a seeded sample of its own vectors.

    Tie-aware: a returned neighbour counts when it scores at least the exact K-th score, so
    duplicate vectors (repeated sentences) do not count as misses.
    """
    import faiss
    import numpy as np

    rng = np.random.default_rng(params.seed)
    n = x.shape[0]
    sample = x[rng.choice(n, size=min(params.recall_sample, n), replace=False)]
    k = min(params.recall_k, n)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    truth, _ = exact.search(sample, k)
    found, found_rows = index.search(sample, k)
    kth = truth[:, -1:] - 1e-6
    hits = ((found >= kth) & (found_rows >= 0)).sum()
    return round(float(hits) / (len(sample) * k), 4)


class Index(Stage[IndexParams]):
    """FAISS indices (`images.faiss`, `texts.faiss`) over the embeddings, with id maps."""

    name = "index"
    version = "1"
    inputs = ("embed_images", "embed_texts")
    tables = ("image_ids", "text_ids")
    libraries = ("pyarrow", "faiss-gpu", "faiss-cpu", "numpy")

    def run(self, ctx: StageContext[IndexParams]) -> None:
        import faiss
        import pyarrow as pa

        p = ctx.params
        images = ctx.read_table("embed_images", "embeddings")
        texts = ctx.read_table("embed_texts", "embeddings")
        built = {}
        for name, table, id_cols in (("images", images, ["image_id"]),
                                     ("texts", texts, ["sent_id", "ref_id"])):
            index, info = build_index(embeddings_matrix(table.column("embedding")), p)
            faiss.write_index(index, str(ctx.tmp_dir / f"{name}.faiss"))
            ctx.write_table(f"{name[:-1]}_ids", pa.table({c: table.column(c) for c in id_cols}))
            built[name] = info
        ctx.record(indices=built, faiss_gpus=faiss.get_num_gpus())
