# nemo-pipe: every target runs inside .venv (made by `make setup`).
# Point the stage targets at real data with DATASET=, DATA_ROOT=, IMAGES=, WORK= (and SET= for
# extra --set overrides); they default to the synthetic demo data made by `make demo-data`.

PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
NEMO      := $(BIN)/nemo-pipe
DEMO_DIR  ?= demo_data
DATASET   ?= refcoco
DATA_ROOT ?= $(DEMO_DIR)/refer
IMAGES    ?= $(DEMO_DIR)/images/train2014
WORK      ?= artifacts
SET       ?=
# CLIP model for the embedding stages. The demo default is the tiny randomly initialised model
# built in code (no weights can be downloaded here); on real data use e.g.
# EMBED_MODEL=ViT-B-16 EMBED_PRETRAINED=openai (cached weights) or =/path/to/checkpoint.pt.
EMBED_MODEL      ?= tiny
EMBED_PRETRAINED ?= null
EXECUTOR  ?= local
MULTIVIEW_BACKEND ?= template
HARD_NEGATIVES ?= true
DEMO_SETS ?= --set embed.model=$(EMBED_MODEL) --set embed.pretrained=$(EMBED_PRETRAINED) \
             --set multiview.backend=$(MULTIVIEW_BACKEND) \
             --set shards.with_hard_negatives=$(HARD_NEGATIVES)
DEMO_DATASETS ?= refcoco refcoco+ refcocog-umd refcocog-google grefcoco
PYTEST_ARGS ?= -n 2

RUN = $(NEMO) run --dataset $(DATASET) --data-root $(DATA_ROOT) --images $(IMAGES) \
      --work-dir $(WORK) --executor $(EXECUTOR) $(DEMO_SETS) $(SET)

.PHONY: setup demo demo-data test lint ingest embeddings negatives multiview hard-negatives shards preview status audit bench bench-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo-data: setup
	@if [ -d "$(DEMO_DIR)/refer" ]; then echo "demo data already in $(DEMO_DIR)"; \
	else $(NEMO) demo-data $(DEMO_DIR); fi

# The main job on the embedded demo: every stage that exists, on every layout, CPU only.
demo: demo-data
	@for ds in $(DEMO_DATASETS); do \
	  $(MAKE) --no-print-directory ingest embeddings negatives multiview hard-negatives shards DATASET=$$ds DATA_ROOT=$(DEMO_DIR)/refer \
	    IMAGES=$(DEMO_DIR)/images/train2014 || exit 1; \
	done
	$(NEMO) status --dataset $(DATASET) --work-dir $(WORK) $(DEMO_SETS)
	$(NEMO) preview $(WORK)/preview-$(DATASET).png --dataset $(DATASET) --work-dir $(WORK) $(DEMO_SETS)
# The audit of every layout's training material: any finding fails the demo (after all ran).
	@st=0; for ds in $(DEMO_DATASETS); do \
	  echo "== audit $$ds"; \
	  $(NEMO) audit --dataset $$ds --work-dir $(WORK) $(DEMO_SETS) || st=1; \
	done; exit $$st

ingest: setup
	$(RUN) --stage ingest

# embed_images + embed_texts + index
embeddings: setup
	$(RUN) --stage embed_images
	$(RUN) --stage embed_texts
	$(RUN) --stage index

# negatives + mosaic_tables (NeMo's candidate and filtered top-K tables)
negatives: setup
	$(RUN) --stage negatives
	$(RUN) --stage mosaic_tables

# multiview + clusters (template backend by default: MULTIVIEW_BACKEND=hf for LLaVA)
multiview: setup
	$(RUN) --stage multiview
	$(RUN) --stage clusters

# augment (rules backend) + hard_negatives
hard-negatives: setup
	$(RUN) --stage augment
	$(RUN) --stage hard_negatives

# thumbnails (their own stage: a tau/K sweep never re-encodes them) + training shards per split,
# read by pipeline.training.dataset.NemoDataset
shards: setup
	$(RUN) --stage thumbnails
	$(RUN) --stage shards

preview: setup
	$(NEMO) preview $(WORK)/preview-$(DATASET).png --dataset $(DATASET) --data-root $(DATA_ROOT) \
	  --images $(IMAGES) --work-dir $(WORK) $(DEMO_SETS) $(SET)

status: setup
	$(NEMO) status --dataset $(DATASET) --work-dir $(WORK) $(DEMO_SETS) $(SET)

# split leaks, positives among negatives, duplicate / own-image negatives, K (exit 1 on findings)
audit: setup
	$(NEMO) audit --dataset $(DATASET) --work-dir $(WORK) $(DEMO_SETS) $(SET)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check pipeline stages tests benchmarks

bench: setup
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

# issue 16's GPU figures into benchmarks/RESULTS-gpu.md; refuses (exit 2) without a CUDA device.
# BENCH_GPU_ARGS="--smoke --allow-cpu" checks its code paths on CPU.
bench-gpu: setup
	$(BIN)/python benchmarks/gpu_bench.py $(BENCH_GPU_ARGS)

clean:
	rm -rf $(WORK) $(DEMO_DIR)
