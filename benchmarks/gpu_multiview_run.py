"""The multiview stage on a GPU with a LLaVA-1.5-7B-shaped model: requests/s and failure reasons.

No real weights can be fetched, so the model is LLaVA-1.5-7B's architecture (CLIP ViT-L/14 at
336 px, 576 image tokens; Llama-2-7B text model, 4096 context) with seeded random weights,
saved with ``save_pretrained`` and loaded back by the stage's own hf path
(``HFVisionGenerator`` through ``stages.multiview.run_model_backend`` / the pipeline).
Throughput does not depend on the weights; a random model never writes EOS
(``generation_config.eos_token_id`` is set to None), so
every request writes its whole token budget and ends as a `truncated` failure: the failure
reasons show the truncation path at scale, not answer quality. The tokenizer is the project's
small test BPE with LLaVA's ``<image>`` token (no Llama tokenizer offline): it writes the
prompt and the reference answer in more tokens than Llama's would (about 2.2 characters a
token, against Llama's 3.3), so the budgets here are about 1.5x a real run's.

Parts (each in its own try block; figures go to ``$OUT/gpu_multiview.json`` as they come):

1. ``build``: the model, built on the device in float16 and saved (seconds, GiB on disk);
2. ``mixed``: ``run_model_backend`` on synthetic images with 1 to 8 instances
   (``--images-per-count`` of each), all in one shard as the stage sends them: requests/s,
   instances/s, generated tokens/s, the budget per instance count, failure reasons, peak GPU
   memory, the batch sizes that ran (``--batch-size``, default ``auto``: sized by the memory
   estimate) and out-of-memory retries;
3. ``stage``: ``nemo-pipe``'s multiview stage end to end (ingest of the synthetic demo data,
   then multiview with ``multiview.model=<saved dir>``): the manifest's figures.

    # on a GPU machine (README.md, Benchmarks; without CUDA it refuses: error, exit 2):
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_multiview_run.py   # figures in $OUT
    # on CPU, tiny sizes, to check the script itself (2-3 minutes on 2 cores):
    python benchmarks/gpu_multiview_run.py --tiny --out /tmp/gpu-mv
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf config.json), and a tiny model of the same shape
SIZES: dict[str, dict[str, Any]] = {
    "7b": {"vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "projection_dim": 768},
           "text": {"vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 32, "max_position_embeddings": 4096,
                    "rms_norm_eps": 1e-5}},
    "tiny": {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                        "projection_dim": 32},
             "text": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                      "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "max_position_embeddings": 4096,
                      "rms_norm_eps": 1e-5}},
}
CATEGORIES = ("person", "dog", "umbrella", "car", "baseball glove", "cup", "horse", "bench")


def build_model(out_dir: Path, size: str, device: str, seed: int = 0) -> dict[str, Any]:
    """A random-init LLaVA of `size`, built on `device` in float16 (float32 on CPU), saved
    with its processor (LLaVA-1.5's chat template); EOS off so every request runs to its
    budget."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from stages.models.llava import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE
    from stages.models.tiny import build_tokenizer

    spec = SIZES[size]
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(image_token=True)
    vision = CLIPVisionConfig(**spec["vision"])
    text = LlamaConfig(**spec["text"], bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    side, patch = spec["vision"]["image_size"], spec["vision"]["patch_size"]
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=(side // patch) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype)  # no-op when the default dtype took
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = None  # random weights: never stop early
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side},
                                           crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    built = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    size_gib = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file()) / 2**30
    return {"size": size, "parameters": params, "dtype": str(dtype).removeprefix("torch."),
            "build_seconds": round(built, 1),
            "save_seconds": round(time.perf_counter() - t0 - built, 1),
            "disk_gib": round(size_gib, 2), "dir": str(out_dir)}


def synthetic_scene(images_dir: Path, per_count: int, max_instances: int,
                    seed: int = 0) -> dict[int, list[dict[str, Any]]]:
    """`per_count` 640x480 JPEGs with k instances for each k in 1..max_instances, as the
    referent rows the stage passes to `run_model_backend`."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images_dir.mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list[dict[str, Any]]] = {}
    image_id = 0
    for k in range(1, max_instances + 1):
        for _ in range(per_count):
            image_id += 1
            w, h = 640, 480
            img = Image.fromarray(rng.integers(60, 200, (h, w, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(img)
            meta = {"image_id": image_id, "file_name": f"{image_id}.jpg", "width": w,
                    "height": h}
            rows = []
            for j in range(k):
                bw, bh = int(rng.integers(60, 200)), int(rng.integers(60, 200))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                draw.rectangle([x, y, x + bw, y + bh],
                               fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
                cat = CATEGORIES[(image_id + j) % len(CATEGORIES)]
                ann = 2_000_000 + 100 * image_id + j
                rows.append({"ref_id": ann, "image_id": image_id, "ann_id": ann,
                             "category": cat, "bbox": [float(x), float(y), float(bw), float(bh)],
                             "rle": None, "sentences": [f"the {cat} on the left",
                                                        f"{cat} number {j + 1}"],
                             "image": meta})
            img.save(images_dir / meta["file_name"], quality=90)
            by_image[image_id] = rows
    return by_image


def run_mixed(model_dir: Path, work: Path, device: str, per_count: int, max_instances: int,
              batch_size: int | str, max_new_tokens: int | None,
              max_attempts: int) -> dict[str, Any]:
    """`run_model_backend` on images of 1..max_instances instances in one shard."""
    import torch

    from stages.models.generation.engines import get_generator, model_key
    from stages.multiview import MultiviewParams, generator_options, run_model_backend
    from stages.text.view_prompts import views_budget

    by_image = synthetic_scene(work / "images", per_count, max_instances)
    p = MultiviewParams(backend="hf", model=str(model_dir), device=device,
                        batch_size=batch_size, max_new_tokens=max_new_tokens,
                        max_attempts=max_attempts)
    payload = {"image_ids": sorted(by_image), "images_dir": str(work / "images"),
               "cache": str(work / "requests.sqlite"),
               # named here, as the stage's driver does: hashing the 14 GB of weights is not
               # generation time
               "model_key": model_key("hf", str(model_dir))}
    t0 = time.perf_counter()
    generator = get_generator("hf", str(model_dir), device, options=generator_options(p))
    load_seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rows, failures, counts = run_model_backend(p, by_image, payload)
    wall = time.perf_counter() - t0
    seconds = counts.get("generation_seconds") or wall
    requests = counts.get("model_requests", 0)
    instances = sum(len(r) for r in by_image.values())
    out = {
        "images": len(by_image), "instances": instances, "batch_size": batch_size,
        "max_attempts": max_attempts, "max_new_tokens_cap": max_new_tokens,
        "load_seconds": round(load_seconds, 1), "wall_seconds": round(wall, 1),
        "generation_seconds": seconds, "model_requests": requests,
        "requests_per_s": round(requests / seconds, 3) if seconds else None,
        "instances_per_s": round(instances / wall, 3) if wall else None,
        "generated_tokens": counts.get("generated_tokens"),
        "tokens_per_s": round(counts.get("generated_tokens", 0) / seconds, 1) if seconds else None,
        "budget_per_instance_count": {
            k: views_budget(k, getattr(generator, "count_tokens", None), max_new_tokens)
            for k in range(1, max_instances + 1)},
        "view_rows": len(rows), "failure_rows": len(failures),
        "failure_reasons": counts.get("failure_reasons"),
        "truncated_answers": counts.get("truncated_answers"),
        "batch_sizes": counts.get("batch_sizes"), "oom_retries": counts.get("oom_retries"),
        "context": getattr(generator, "context", None),
        "example_failure": failures[0]["reason"][:300] if failures else None,
    }
    if device.startswith("cuda"):
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def run_stage(model_dir: Path, work: Path, device: str, n_images: int, batch_size: int | str,
              max_new_tokens: int | None, max_attempts: int) -> dict[str, Any]:
    """The multiview stage end to end through the pipeline, on the synthetic demo data."""
    from pipeline.api import open_pipeline
    from stages.refer.synthetic import write_demo_data

    demo = write_demo_data(work / "demo", n_images=n_images)
    sets = ["multiview.backend=hf", f"multiview.model={model_dir}",
            f"multiview.device={device}", f"multiview.batch_size={batch_size}",
            f"multiview.max_attempts={max_attempts}",
            f"multiview.max_new_tokens={'null' if max_new_tokens is None else max_new_tokens}"]
    pipe = open_pipeline("refcoco", work / "work", data_root=demo.refer_root,
                         images=demo.images_dir, sets=sets, progress=False)
    t0 = time.perf_counter()
    pipe.run("multiview")
    wall = time.perf_counter() - t0
    manifest = pipe.store.manifest("refcoco", "multiview", pipe.resolve("multiview").key)
    return {"wall_seconds_with_ingest": round(wall, 1), "stats": manifest.get("stats", {})}


def _batch_size(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"), help="figures go here")
    ap.add_argument("--scratch", default=None, help="model and data (default: OUT/../scratch "
                                                    "on CPU, /tmp/gpu-mv on the GPU machine)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--images-per-count", type=int, default=None, help="default 4 (tiny: 1)")
    ap.add_argument("--max-instances", type=int, default=8)
    ap.add_argument("--batch-size", type=_batch_size, default="auto",
                    help="multiview.batch_size: a cap, or auto (memory-sized; default)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="multiview cap (none)")
    ap.add_argument("--max-attempts", type=int, default=1)
    ap.add_argument("--stage-images", type=int, default=40, help="demo images for part 3")
    ap.add_argument("--parts", default="build,mixed,stage")
    args = ap.parse_args(argv)
    size = "tiny" if args.tiny else "7b"
    device = args.device or ("cpu" if args.tiny else "cuda")
    if not args.tiny or device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # every part would fail; refuse before any write
            print("error: benchmarks/gpu_multiview_run.py needs a CUDA GPU "
                  "(torch.cuda.is_available() is False here): run it on the GPU machine "
                  "(README.md, Benchmarks) or pass --tiny for the CPU check of the script",
                  file=sys.stderr)
            return 2
    per_count = args.images_per_count or (1 if args.tiny else 4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch or ("/tmp/gpu-mv" if not args.tiny else out.parent / "scratch"))
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    os.environ["NEMO_WORK_DIR"] = str(scratch / "nemo-work")
    model_dir = scratch / f"llava-{size}-random"
    figures: dict[str, Any] = {"size": size, "device": device, "argv": sys.argv[1:]}
    try:
        import torch
        import transformers

        figures["versions"] = {"torch": torch.__version__,
                               "transformers": transformers.__version__,
                               "gpu": torch.cuda.get_device_name(0)
                               if torch.cuda.is_available() else None}
    except Exception as exc:  # still write what we can
        figures["versions"] = repr(exc)

    def save() -> None:
        (out / "gpu_multiview.json").write_text(json.dumps(figures, indent=2) + "\n")

    parts = args.parts.split(",")
    steps = [
        ("build", lambda: build_model(model_dir, size, device)),
        ("mixed", lambda: run_mixed(model_dir, scratch / "mixed", device, per_count,
                                    args.max_instances, args.batch_size, args.max_new_tokens,
                                    args.max_attempts)),
        ("stage", lambda: run_stage(model_dir, scratch / "stage", device, args.stage_images,
                                    args.batch_size, args.max_new_tokens, args.max_attempts)),
    ]
    for name, step in steps:
        if name not in parts:
            continue
        print(f"[gpu_multiview_run] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            figures[name] = step()
        except Exception as exc:
            figures[name] = {"error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-3000:]}
        figures[name]["part_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[gpu_multiview_run] {name}: {json.dumps(figures[name])[:600]}", flush=True)
        save()
    print(f"[gpu_multiview_run] figures in {out / 'gpu_multiview.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
