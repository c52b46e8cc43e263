"""The HTML report over pipelines built on the demo data, checked against the tables."""

from __future__ import annotations

import base64
import io
import re
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.api import open_pipeline
from pipeline.errors import InputError
from pipeline.io import read_table_dir
from stages.tools.report import report_command, write_report

SETS = ["embed.model=tiny", "embed.pretrained=null", "multiview.backend=template"]
TAU, K = 0.7, 20  # the sweep point checked against an independent computation
HEADERS = ["stage", "state", "key", "rows", "bytes", "seconds", "peak memory (MiB)",
           "notable params"]


@pytest.fixture(scope="module")
def built(demo, tmp_path_factory):
    """One work dir: shards without hard negatives (report A), then with them (report B)."""
    root = tmp_path_factory.mktemp("report")
    work = root / "work"
    plain = open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                          sets=SETS, progress=False)
    plain.run("shards")
    report_a = write_report(plain, root / "a.html", ks=(3, K))
    hn_sets = [*SETS, "shards.with_hard_negatives=true"]
    full = open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=hn_sets, progress=False)
    full.run("shards")
    report_b = write_report(full, root / "b.html", images_dir=demo.images_dir, n_mosaics=4,
                            ks=(3, K, 100))
    return {"plain": plain, "full": full, "a": report_a, "b": report_b, "root": root,
            "work": work, "hn_sets": hn_sets}


def _section(doc: str, sid: str) -> str:
    start = doc.index(f"<section id='{sid}'>")
    return doc[start:doc.index("</section>", start)]


def _pngs(doc: str) -> list[Image.Image]:
    out = []
    for data in re.findall(r'<img src="data:image/png;base64,([^"]+)"', doc):
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            img.load()
            out.append(img.copy())
    return out


def _assert_self_contained(doc: str) -> None:
    assert 'src="http' not in doc and "src='http" not in doc
    assert "<link" not in doc and "<script" not in doc and "url(" not in doc
    srcs = re.findall(r"<img\b[^>]*?\bsrc=[\"']([^\"']*)", doc)
    assert len(srcs) == doc.count("<img")
    assert all(s.startswith("data:image/png;base64,") for s in srcs)


def _cell(section: str, table_id: str, attrs: str) -> str:
    table = section[section.index(f"<table id='{table_id}'>"):]
    table = table[:table.index("</table>")]
    (value,) = re.findall(attrs + r">([^<]+)<", table)
    return value


def _fmt(tau: float | None) -> str:
    return "off" if tau is None else f"{tau:g}"


def _kept_by_hand(negatives, tau: float | None, k: int, only: set[int] | None = None) -> float:
    """Mean kept per query: min-max scale rho_ti per query, drop >= tau, keep the first K
    (over the queries whose sent_id is in `only`, when given)."""
    kept = []
    for sid, cand, rho, lo, hi in zip(negatives.column("sent_id").to_pylist(),
                                      negatives.column("cand_image_ids").to_pylist(),
                                      negatives.column("rho_ti").to_pylist(),
                                      negatives.column("ti_min").to_pylist(),
                                      negatives.column("ti_max").to_pylist(), strict=True):
        if only is not None and sid not in only:
            continue
        assert len(cand) == len(rho)
        s = ((np.asarray(rho, np.float64) - lo) / (hi - lo) if hi > lo
             else np.zeros(len(rho)))
        survivors = len(s) if tau is None else int((s < tau).sum())
        kept.append(min(survivors, k))
    return float(np.mean(kept))


def test_report_with_every_stage(built, demo):
    pipe = built["full"]
    doc = built["b"].read_text(encoding="utf-8")
    _assert_self_contained(doc)

    images = _pngs(doc)
    assert len(images) == 5  # raw and declared histograms, kept curves, kinds, mosaic sheet
    for img in images:
        assert 300 <= img.size[0] <= 3000 and 200 <= img.size[1] <= 3000, img.size
        assert np.unique(np.asarray(img.convert("L"))).size > 10  # not a blank canvas
    assert images[-1].size[0] == 4 * 320  # render_preview's sheet of 4 cells

    stages = _section(doc, "stages")
    for name in pipe.registry.topological():
        assert f"<td>{name}</td>" in stages
    for h in HEADERS:
        assert f"<th>{h}</th>" in stages
    assert stages.count("class='state-done'") == len(pipe.registry.topological())
    mp = pipe.resolve("mosaic_tables").params
    assert f"tau_ti={mp.tau_ti}" in stages and f"K={mp.k}" in stages
    assert "CLIP=nemo-tiny (random init)" in stages
    peak = pipe.store.manifest("refcoco", "negatives", pipe.resolve("negatives").key)
    assert f"{peak['stats']['peak_rss_mb']:.1f}" in stages

    scores = _section(doc, "scores")
    assert mp.relevance == "ti" and mp.scale == "minmax" and mp.tau_ti == 0.85
    assert "tau_ti = 0.85" in scores and "scale = minmax" in scores
    negatives = read_table_dir(pipe.artifact_dir("negatives") / "negatives")
    n_cand = sum(len(c) for c in negatives.column("cand_image_ids").to_pylist())
    assert f"{n_cand:,} candidates of {negatives.num_rows:,} query sentences" in scores

    kept = _section(doc, "kept")
    printed = float(_cell(kept, "kept-table", f"data-tau='{TAU:g}' data-k='{K}'"))
    assert printed == pytest.approx(_kept_by_hand(negatives, TAU, K), abs=5e-4)
    printed_off = float(_cell(kept, "kept-table", f"data-tau='off' data-k='{K}'"))
    assert printed_off == pytest.approx(_kept_by_hand(negatives, None, K), abs=5e-4)
    # The configured point (highlighted) is what mosaic_tables published.
    mosaic = read_table_dir(pipe.artifact_dir("mosaic_tables") / "mosaic")
    current = float(_cell(kept, "kept-table",
                          f"class='num current' data-tau='{mp.tau_ti:g}' data-k='{mp.k}'"))
    lengths = [len(x) for x in mosaic.column("neg_image_ids").to_pylist()]
    assert current == pytest.approx(np.mean(lengths), abs=5e-4)
    assert f"Computed on all {negatives.num_rows:,} training queries." in kept

    hn = _section(doc, "hard-negatives")
    table = read_table_dir(pipe.artifact_dir("hard_negatives") / "hard_negatives")
    expected = Counter(k for kinds in table.column("neg_kinds").to_pylist() for k in kinds)
    shown = {k: int(v) for k, v in re.findall(r"data-kind='([^']+)'>(\d+)<", hn)}
    assert shown == dict(expected) and len(shown) >= 4
    assert "the <code>hard_negatives</code> table" in hn
    aug = pipe.store.manifest("refcoco", "augment", pipe.resolve("augment").key)
    report = aug["stats"]["report"]
    shown_aug = {k: int(v) for k, v in re.findall(r"data-augment-kind='([^']+)'>(\d+)<", hn)}
    assert shown_aug == {k: r["count"] for k, r in report.items()}

    mosaics = _section(doc, "mosaics")
    assert mosaics.count("<img") == 1 and "4 samples of the train split" in mosaics


def test_report_falls_back_to_shard_kinds_and_says_what_is_missing(built):
    pipe = built["plain"]
    doc = built["a"].read_text(encoding="utf-8")
    _assert_self_contained(doc)
    assert len(_pngs(doc)) == 4  # no mosaic sheet without an images dir

    for name in ("multiview", "clusters", "augment", "hard_negatives"):
        assert re.search(rf"<td>{name}</td><td class='state-missing'>missing</td>", doc)
    hn = _section(doc, "hard-negatives")
    counts: Counter[str] = Counter()
    for part in sorted((pipe.artifact_dir("shards") / "train").glob("part-*.parquet")):
        for kinds in pq.read_table(part, columns=["hn_kinds"]).column("hn_kinds").to_pylist():
            counts.update(kinds or [])
    shown = {k: int(v) for k, v in re.findall(r"data-kind='([^']+)'>(\d+)<", hn)}
    assert shown == dict(counts) == {"same_image": counts["same_image"]}
    assert "<code>hn_kinds</code>" in hn
    assert "No augment report: augment is not built" in hn
    assert "no images dir was given" in _section(doc, "mosaics")


def test_report_with_only_ingest(demo, work, tmp_path):
    pipe = open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=SETS, progress=False)
    pipe.run("ingest")
    doc = write_report(pipe, tmp_path / "r.html", images_dir=demo.images_dir).read_text()
    _assert_self_contained(doc)
    # OUT a directory: an error naming it, and no temp file left beside it
    (tmp_path / "rdir").mkdir()
    with pytest.raises(InputError, match="rdir: cannot write the report"):
        write_report(pipe, tmp_path / "rdir", images_dir=demo.images_dir)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rdir")]
    assert "<img" not in doc
    stages = _section(doc, "stages")
    assert "<td>ingest</td><td class='state-done'>done</td>" in stages
    assert stages.count("class='state-missing'") == len(pipe.registry.topological()) - 1
    for h in HEADERS:
        assert f"<th>{h}</th>" in stages
    for sid, stage in (("scores", "negatives"), ("kept", "negatives"),
                       ("hard-negatives", "hard_negatives"), ("hard-negatives", "augment"),
                       ("mosaics", "shards")):
        section = _section(doc, sid)
        assert f"{stage} is not built under the current config" in section, (sid, stage)
        assert f"nemo-pipe run --stage {stage} --dataset refcoco" in section


def test_report_command_resolves_images_like_preview(built, demo, tmp_path):
    out = report_command("refcoco", tmp_path / "sub" / "cmd.html", work_dir=built["work"],
                         sets=built["hn_sets"], data_root=demo.refer_root,
                         images=demo.images_dir, n_mosaics=2)
    doc = out.read_text(encoding="utf-8")
    _assert_self_contained(doc)
    assert "2 samples of the train split" in _section(doc, "mosaics")
    assert len(_pngs(doc)) == 5

    # No data root and nothing remembered: the report still renders, every stage unresolved.
    bare = report_command("refcoco", tmp_path / "bare.html", work_dir=tmp_path / "empty",
                          sets=SETS)
    doc = bare.read_text(encoding="utf-8")
    assert "<img" not in doc and "no data root" in doc
    assert "negatives is not built: it cannot even be resolved" in _section(doc, "scores")


def test_kept_sweep_counts_training_queries_only(demo, tmp_path):
    """negatives.query_splits wider than train adds rows no mosaic is made of: the kept sweep
    is over the training queries (found here from ingest by hand), the histograms over all."""
    pipe = open_pipeline("refcoco", tmp_path / "work", data_root=demo.refer_root,
                         images=demo.images_dir, progress=False,
                         sets=[*SETS, "negatives.query_splits=[train,val,testA,testB]"])
    pipe.run("negatives")
    doc = write_report(pipe, tmp_path / "r.html", ks=(3, K)).read_text(encoding="utf-8")
    negatives = read_table_dir(pipe.artifact_dir("negatives") / "negatives")
    ingest = pipe.artifact_dir("ingest")
    train_refs = {r["ref_id"] for r in read_table_dir(ingest / "refs").to_pylist()
                  if r["split"] == "train"}
    train = {s["sent_id"] for s in read_table_dir(ingest / "sentences").to_pylist()
             if s["ref_id"] in train_refs}
    n_train = sum(s in train for s in negatives.column("sent_id").to_pylist())
    assert 0 < n_train < negatives.num_rows
    kept = _section(doc, "kept")
    differs = False  # the evaluation rows would change at least one point
    for tau in (0.5, 0.7, 0.9, None):
        for k in (3, K):
            printed = float(_cell(kept, "kept-table", f"data-tau='{_fmt(tau)}' data-k='{k}'"))
            assert printed == pytest.approx(_kept_by_hand(negatives, tau, k, train), abs=5e-4)
            differs |= abs(printed - _kept_by_hand(negatives, tau, k)) > 5e-4
    assert differs
    assert f"Computed on all {n_train:,} training queries." in kept
    assert f"The {negatives.num_rows - n_train:,} queries of other splits" in kept
    assert f"of {negatives.num_rows:,} query sentences" in _section(doc, "scores")
