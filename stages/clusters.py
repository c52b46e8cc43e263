"""clusters: per instance, the cluster of its multi-view expressions in CLIP text space.

The method notes define an instance's cluster by its view expressions and its centre mu as the
mean of the view embeddings; a new expression e is outside the cluster when
cos(e, mu) < `clusters.threshold` (used by hard-negative mining). Views are embedded with the
same CLIP text encoder and config (`embed.*`) as `embed_texts`, through its shared function.
`clusters.include_original` adds the instance's original sentences to the mean.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.stage import Cosine, Params, Stage, StageContext
from stages.embed import TEXT_ENCODER_FIELDS, EmbedParams, embedding_array

HIST_BINS = 20


class ClustersParams(Params):
    threshold: Cosine = Field(0.8, description="cos(e, mu) below it is outside the cluster")
    include_original: bool = Field(False, description="add the original sentences to mu")


class Clusters(Stage[ClustersParams]):
    """Per-instance cluster centre mu and spread of the multi-view expressions."""

    name = "clusters"
    version = "2"  # 2: one member per (object, view) when referents share an object
    # embed_texts is upstream so that a change of CLIP weights (in its key) reaches this key
    inputs = ("multiview", "ingest", "embed_texts")
    tables = ("clusters", "view_embeddings")
    libraries = ("pyarrow", "torch", "open_clip_torch", "numpy")
    uses_sections = ("embed",)
    key_fields = {"embed": TEXT_ENCODER_FIELDS}  # the shared text encoder only

    def run(self, ctx: StageContext[ClustersParams]) -> None:
        import numpy as np
        import pyarrow as pa

        from stages.embed import encode_sentences

        p = ctx.params
        embed: EmbedParams = ctx.shared["embed"]  # type: ignore[assignment]
        views = ctx.read_table("multiview", "views").sort_by([("ann_id", "ascending"),
                                                              ("view", "ascending")])
        texts = views.column("text").to_pylist()
        vecs = encode_sentences(embed, texts)  # (0, d) for no views: lists of the model's d
        ann = views.column("ann_id").to_numpy()
        ref = views.column("ref_id").to_numpy()
        names = views.column("view").to_pylist()
        # one member per (object, view): referents sharing an object carry the same views
        groups: dict[int, list[int]] = {}
        refs_of: dict[int, list[int]] = {}
        seen: set[tuple[int, str]] = set()
        for i, a in enumerate(ann.tolist()):
            refs_of.setdefault(a, [])
            if int(ref[i]) not in refs_of[a]:
                refs_of[a].append(int(ref[i]))
            if (a, names[i]) not in seen:
                seen.add((a, names[i]))
                groups.setdefault(a, []).append(i)
        extra: dict[int, Any] = {}
        if p.include_original:
            sents = ctx.read_table("ingest", "sentences").select(["ref_id", "sent"]).to_pylist()
            by_ref: dict[int, list[str]] = {}
            for s in sents:
                by_ref.setdefault(s["ref_id"], []).append(s["sent"])
            for a in groups:  # the sentences of every referent of the object
                originals = [t for r in refs_of[a] for t in by_ref.get(r, [])]
                extra[a] = encode_sentences(embed, originals) if originals else None
        mus, spreads, n_views, ref_ids = [], [], [], []
        for a, rows in groups.items():
            members = vecs[rows]
            if extra.get(a) is not None:
                members = np.concatenate([members, extra[a]])
            members = members / np.linalg.norm(members, axis=1, keepdims=True)
            mu = members.mean(axis=0)
            mu = mu / np.linalg.norm(mu)
            mus.append(mu)
            spreads.append(float((members @ mu).mean()))
            n_views.append(len(rows))
            ref_ids.append(int(ref[rows[0]]))
        dim = vecs.shape[1]
        mu_matrix = np.stack(mus) if mus else np.zeros((0, dim), np.float32)
        ctx.write_table("clusters", pa.table({
            "ref_id": pa.array(ref_ids, pa.int64()),
            "ann_id": pa.array(list(groups), pa.int64()),
            "mu": embedding_array(mu_matrix),
            "spread": pa.array(spreads, pa.float32()),
            "n_views": pa.array(n_views, pa.int32()),
        }))
        ctx.write_table("view_embeddings", pa.table({
            "ref_id": views.column("ref_id"), "ann_id": views.column("ann_id"),
            "view": views.column("view"), "embedding": embedding_array(vecs),
        }))
        hist = np.histogram(spreads, bins=HIST_BINS, range=(-1.0, 1.0))[0].tolist()
        ctx.record(clusters=len(groups), views=len(texts),
                   spread_histogram={"bins": HIST_BINS, "range": [-1, 1], "counts": hist},
                   spread_mean=round(float(np.mean(spreads)), 4) if spreads else None)
        ctx.extra["clip_model"] = {"model": embed.model, "pretrained": embed.pretrained}
