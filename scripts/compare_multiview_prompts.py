"""Compare the one-prompt-per-image and the per-instance multiview prompts on real data.

For a GPU user with a real VLM: runs the multiview stage twice on the same first N training
images (`multiview.per_instance=false` and `true`), then clusters, and prints per mode the
success rate, attempts per request, requests/s, tokens/s, and two quality proxies: the mean
cluster spread (how consistent an instance's views are) and the mean CLIP cosine between an
instance's views and its original sentences (how well the views stay on the referent).

    .venv/bin/python scripts/compare_multiview_prompts.py --dataset refcocog-umd \\
        --data-root data/refer --images data/images/train2014 --work-dir /scratch/nemo \\
        --model llava-hf/llava-1.5-7b-hf --n-images 200 [--backend vllm] \\
        [--set embed.model=ViT-B-16 --set embed.pretrained=/models/vit-b-16.pt]

Works on CPU with `--model tiny` too (plumbing only: the tiny model writes noise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.api import open_pipeline  # noqa: E402
from pipeline.io import read_table_dir  # noqa: E402
from stages.embed import embeddings_matrix, encode_sentences  # noqa: E402


def run_mode(args: argparse.Namespace, per_instance: bool) -> dict[str, float | None]:
    sets = [f"multiview.backend={args.backend}", f"multiview.model={args.model}",
            f"multiview.limit_images={args.n_images}",
            f"multiview.per_instance={str(per_instance).lower()}", *args.set]
    pipe = open_pipeline(args.dataset, args.work_dir, sets=sets, data_root=args.data_root,
                         images=args.images)
    pipe.run("clusters")
    m = pipe.store.manifest(args.dataset, "multiview", pipe.resolve("multiview").key)["stats"]
    views = read_table_dir(pipe.artifact_dir("multiview") / "views").to_pylist()
    clusters = read_table_dir(pipe.artifact_dir("clusters") / "clusters")
    sents = read_table_dir(pipe.artifact_dir("ingest") / "sentences").to_pylist()
    by_ref: dict[int, list[str]] = {}
    for s in sents:
        by_ref.setdefault(s["ref_id"], []).append(s["sent"])
    embed = pipe.resolve("clusters").shared["embed"]
    mus = embeddings_matrix(clusters.column("mu"))
    cosines = []
    for mu, ref_id in zip(mus, clusters.column("ref_id").to_pylist(), strict=True):
        originals = encode_sentences(embed, by_ref.get(ref_id, []))
        if len(originals):
            cosines.append(float((originals @ mu).mean()))
    return {**generation_figures(m, [v["attempts"] for v in views]),
            "mean_spread": (float(np.mean(clusters.column("spread").to_numpy())) if len(mus)
                            else None),
            "views_to_original_cosine": float(np.mean(cosines)) if cosines else None}


def generation_figures(stats: dict, attempts: list[int]) -> dict[str, float | int | None]:
    """The multiview manifest's figures in units both modes share. Success is per instance:
    the failures table has a row per image in one mode and per failed instance (or group)
    in the other, so only `failed_instances` / `instances` compares them. `requests_per_s`
    counts model calls, repairs included (a job is an image in both modes)."""
    instances = stats["instances"]
    return {
        "images": stats["images"], "instances": instances,
        "instance_success_rate": (1 - stats["failed_instances"] / instances if instances
                                  else None),
        "truncated_answers": stats.get("truncated_answers"),
        "attempts_per_view_row": float(np.mean(attempts)) if attempts else None,
        "model_requests_per_s": stats.get("requests_per_s"),
        "tokens_per_s": stats.get("tokens_per_s"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--work-dir", default="artifacts")
    ap.add_argument("--model", default="llava-hf/llava-1.5-7b-hf")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = ap.parse_args()
    rows = {"per image": run_mode(args, False), "per instance": run_mode(args, True)}
    keys = list(next(iter(rows.values())))
    print(f"{'':<26}" + "".join(f"{mode:>16}" for mode in rows))
    for k in keys:
        cells = []
        for r in rows.values():
            v = r[k]
            cells.append(f"{v:>16.3f}" if isinstance(v, float) else f"{v!s:>16}")
        print(f"{k:<26}" + "".join(cells))


if __name__ == "__main__":
    main()
