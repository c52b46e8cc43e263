#!/usr/bin/env bash
# End to end at RefCOCO scale on CPU: synthetic data with RefCOCO-like ratios (20,000 images,
# about 48k refs, 135k sentences), every stage with the tiny CLIP model, the template multiview
# backend and the rules augment backend; then the same with the dask executor and 2 workers;
# last, the multiview stage with the tiny random LLaVA (hf backend) on the first 200 images.
# Each stage runs in its own process, so its manifest's peak memory is that stage's own.
# Prints a markdown table (stage, rows, seconds, peak MiB) per executor. Not part of make test.
#
# After each executor's run, `nemo-pipe audit` checks the published training material (split
# leaks, positives among negatives, duplicates, own image, K) and the script stops on a finding.
#
#   benchmarks/scale_run.sh [N_IMAGES=20000] [OUT=/tmp/nemo-scale]
#   EXECUTORS="local" benchmarks/scale_run.sh ...   # only the local executor
#   SKIP_LLAVA=1 benchmarks/scale_run.sh ...        # without the tiny-LLaVA multiview run
set -euo pipefail
N=${1:-20000}
OUT=${2:-/tmp/nemo-scale}
cd "$(dirname "$0")/.."
NEMO=.venv/bin/nemo-pipe
# clusters.threshold=0.99: the random tiny CLIP's text embeddings are nearly parallel (cosines
# above 0.9), so at the default 0.8 almost every text is inside every cluster and the neighbour
# search of each referent deepens to hard_negatives.max_search_k (slow; see the README).
SETS=(--set embed.model=tiny --set embed.pretrained=null --set multiview.backend=template
      --set augment.backend=rules --set shards.with_hard_negatives=true
      --set clusters.threshold=0.99)
STAGES=(ingest embed_images embed_texts index negatives mosaic_tables thumbnails multiview clusters augment
        hard_negatives shards)

mkdir -p "$OUT"
if [ ! -d "$OUT/data/refer" ]; then
  /usr/bin/time -v "$NEMO" demo-data "$OUT/data" --n-images "$N" 2> "$OUT/demo-data.time"
fi
for executor in ${EXECUTORS:-local dask}; do
  work="$OUT/work-$executor"
  for stage in "${STAGES[@]}"; do
    "$NEMO" run --stage "$stage" --dataset refcoco --data-root "$OUT/data/refer" \
      --images "$OUT/data/images/train2014" --work-dir "$work" --executor "$executor" \
      --workers 2 "${SETS[@]}" > /dev/null
  done
  "$NEMO" audit --dataset refcoco --work-dir "$work" "${SETS[@]}" --json "$OUT/audit-$executor.json"
  echo "### executor: $executor ($N images, $(nproc) cores)"
  .venv/bin/python - "$work" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1]) / "refcoco"
print("| stage | rows | seconds | peak MiB |\n|---|---:|---:|---:|")
order = ["ingest", "embed_images", "embed_texts", "index", "negatives", "mosaic_tables",
         "thumbnails",
         "multiview", "clusters", "augment", "hard_negatives", "shards"]
total = 0.0
for stage in order:
    for m in sorted((work / stage).glob("*/_manifest.json")):
        d = json.loads(m.read_text())
        rows = sum(f.get("rows", 0) for f in d["files"].values())
        secs = d["stats"].get("seconds", 0.0)
        total += secs
        print(f"| {stage} | {rows} | {secs:.1f} | {d['stats'].get('peak_rss_mb', 0):.0f} |")
print(f"| **total** | | {total:.1f} | |")
PY
done

[ -n "${SKIP_LLAVA:-}" ] && exit 0
# the real VLM path at a size CPU can afford: tiny LLaVA, 200 images (ingest reused)
"$NEMO" run --stage multiview --dataset refcoco --data-root "$OUT/data/refer" \
  --images "$OUT/data/images/train2014" --work-dir "$OUT/work-local" "${SETS[@]}" \
  --set multiview.backend=hf --set multiview.model=tiny --set multiview.limit_images=200 \
  > /dev/null
echo "### multiview, tiny LLaVA (hf backend), first 200 images"
.venv/bin/python - "$OUT/work-local" <<'PY'
import json, sys
from pathlib import Path
for m in sorted((Path(sys.argv[1]) / "refcoco" / "multiview").glob("*/_manifest.json")):
    d = json.loads(m.read_text())
    if d["params"].get("backend") != "hf":
        continue
    rows = sum(f.get("rows", 0) for name, f in d["files"].items() if name.startswith("views/"))
    s = d["stats"]
    print(f"{rows} views in {s.get('seconds', 0):.1f} s, peak {s.get('peak_rss_mb', 0):.0f} "
          "MiB; " + json.dumps({k: v for k, v in s.items() if k not in ("seconds", "peak_rss_mb")}))
PY
