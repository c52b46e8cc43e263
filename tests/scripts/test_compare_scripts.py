"""scripts/compare_artifacts.py and scripts/compare_multiview_prompts.py against hand-made
work dirs and manifests, and the prompt comparison end to end on the demo (tiny LLaVA)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def publish(root: Path, ds: str, stage: str, key: str, tables: dict[str, pa.Table]) -> None:
    d = root / ds / stage / key
    for name, table in tables.items():
        (d / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, d / name / "part-00000.parquet")
    (d / "_manifest.json").write_text("{}")
    (d / "_SUCCESS").write_text("")


def test_compare_artifacts_sorts_files_into_identical_same_rows_and_differ(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    t = pa.table({"x": [1, 2, 3]})
    tagged = t.replace_schema_metadata({b"nemo_pipe.schema_version": b"2"})
    publish(before, "refcoco", "ingest", "k1", {"refs": t, "images": t})
    publish(after, "refcoco", "ingest", "k1", {"refs": t, "images": tagged})
    publish(before, "refcoco", "negatives", "k2", {"negatives": t})
    publish(after, "refcoco", "negatives", "k3", {"negatives": pa.table({"x": [1, 2, 4]})})
    publish(before, "refcoco", "shards", "k4", {"train": t})
    compare = load_script("compare_artifacts").compare

    lines, matched = compare(before, after)
    assert not matched
    by_stage = {line.split()[1]: line for line in lines}
    assert "same key: 1 identical, 1 same rows, 0 differ" in by_stage["ingest"]
    assert "new key: 0 identical, 0 same rows, 1 differ" in by_stage["negatives"]
    assert "negatives/part-00000.parquet differs" in by_stage["negatives"]
    assert by_stage["shards"].endswith("only before")

    lines, matched = compare(before, before)
    assert matched and all("0 differ" in line for line in lines)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_artifacts.py"),
                           str(before), str(after)], capture_output=True, text=True)
    assert proc.returncode == 1 and "only before" in proc.stdout


def test_compare_artifacts_names_a_stage_with_several_keys(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    t = pa.table({"x": [1]})
    publish(before, "refcoco", "ingest", "a", {"refs": t})
    publish(before, "refcoco", "ingest", "b", {"refs": t})
    publish(after, "refcoco", "ingest", "a", {"refs": t})
    lines, matched = load_script("compare_artifacts").compare(before, after)
    assert matched
    assert "first of 2 / 1 published keys" in lines[0]


@pytest.mark.parametrize(("stats", "want"), [
    # per image: one failures row per image (2 rows) for 5 failed instances of 8
    ({"images": 3, "instances": 8, "failed_instances": 5, "failures": 2,
      "requests_per_s": 2.0, "tokens_per_s": 100.0, "truncated_answers": 1}, 3 / 8),
    # per instance: a failures row per failed instance, more rows than images
    ({"images": 3, "instances": 8, "failed_instances": 7, "failures": 7,
      "requests_per_s": 5.0, "tokens_per_s": 90.0, "truncated_answers": 0}, 1 / 8),
    ({"images": 0, "instances": 0, "failed_instances": 0, "failures": 0}, None),
])
def test_prompt_comparison_counts_success_per_instance_in_both_modes(stats, want):
    figures = load_script("compare_multiview_prompts").generation_figures(stats, [1, 2, 3])
    assert figures["instance_success_rate"] == want
    assert figures["attempts_per_view_row"] == 2.0
    assert figures["model_requests_per_s"] == stats.get("requests_per_s")


@pytest.mark.slow
def test_prompt_comparison_runs_on_the_demo_with_the_tiny_model(demo, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare_multiview_prompts.py"),
         "--dataset", "refcoco", "--data-root", str(demo.refer_root), "--images",
         str(demo.images_dir), "--work-dir", str(tmp_path / "work"), "--model", "tiny",
         "--n-images", "2", "--set", "embed.model=tiny", "--set", "embed.pretrained=null"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[-10:]
            if line.strip()}
    assert rows["images"] == ["2", "2"]
    for rate in rows["instance_success_rate"]:
        assert 0.0 <= float(rate) <= 1.0
