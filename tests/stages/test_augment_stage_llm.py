"""The augment stage with the llm backend on the tiny causal LM: plumbing and per-request resume."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline.api import open_pipeline

pytestmark = pytest.mark.slow

SETS = ["embed.model=tiny", "embed.pretrained=null", "augment.backend=llm", "augment.model=tiny",
        "augment.kinds=[swap_color]", "augment.per_kind=1", "augment.max_attempts=1",
        "augment.splits=[testA]"]


def test_llm_backend_runs_and_reruns_from_the_request_cache(demo, work, monkeypatch):
    monkeypatch.setenv("NEMO_WORK_DIR", str(work))
    pipe = open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=SETS, progress=False)
    pipe.run("augment")
    m = pipe.store.manifest("refcoco", "augment", pipe.resolve("augment").key)
    n = m["stats"]["sentences"]
    assert n > 0 and m["stats"]["generated_requests"] == n  # one request per sentence and kind
    rows = (pq.read_table(pipe.artifact_dir("augment") / "distractors").num_rows
            + pq.read_table(pipe.artifact_dir("augment") / "rejected").num_rows)
    assert rows >= 1  # the tiny model's noise is rejected with a reason, never dropped
    reasons = pq.read_table(pipe.artifact_dir("augment") / "rejected").column("reason")
    assert all(reasons.to_pylist())
    pipe.run("augment", force=True)
    m = pipe.store.manifest("refcoco", "augment", pipe.resolve("augment").key)
    assert m["stats"]["generated_requests"] == 0 and m["stats"]["cached_requests"] == n
