# amodal3d — every target installs what it needs first (`setup` is idempotent).
# Usage: make bench [PROTOCOL=gt-visible|gt-box|detect]; make train STAGE=recon [EXP=name] [DEBUG=fdr|tiny|overfit] [RESUME=run_id] [OVERRIDES="trainer.max_epochs=3"]
SHELL := /bin/bash
# +B: no brace expansion, so dict overrides (OVERRIDES="data.objects_per_split={train:1,val:0}") reach the CLI whole
.SHELLFLAGS := +B -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)

STAGE ?= recon
EXP ?=
DEBUG ?=
RESUME ?=
OVERRIDES ?=
PORT ?= 6006
PYTEST_ARGS ?=
PROTOCOL ?=
BENCH_ARGS = $(if $(PROTOCOL),--protocol $(PROTOCOL)) $(if $(EXP),--exp $(EXP))

CFG_ARGS = $(if $(EXP),--exp $(EXP)) $(if $(DEBUG),--debug $(DEBUG))

.PHONY: slurm setup test test-all train data validate bench bench-table bench-seeds bench-speed bench-recon-step bench-loader bench-raster bench-crops bench-hardest bench-recon bench-detections predict sheets tensorboard stages clean help

help:
	@echo "make setup | test | test-all | train STAGE=.. | data | validate | export OUT=.. | bench [PROTOCOL=gt-visible|gt-box|detect] | bench-table | bench-seeds | bench-speed | bench-recon-step | bench-loader | bench-raster | bench-crops | bench-hardest | bench-recon | bench-detections | predict INPUT=.. OUT=.. | sheets | tensorboard | stages | clean"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

test: setup
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

train: setup
	$(PY) -m amodal3d train --stage $(STAGE) $(CFG_ARGS) $(if $(RESUME),--resume $(RESUME)) $(OVERRIDES)

data: setup
	$(PY) -m amodal3d data $(CFG_ARGS) $(OVERRIDES)

validate: setup
	$(PY) -m amodal3d validate $(CFG_ARGS) $(OVERRIDES)

bench: setup
	$(PY) -m amodal3d bench all $(BENCH_ARGS) $(OVERRIDES)

bench-table: setup
	$(PY) -m amodal3d bench table $(BENCH_ARGS) $(OVERRIDES)

bench-seeds: setup
	$(PY) -m amodal3d bench seeds $(BENCH_ARGS) $(OVERRIDES)

bench-speed: setup
	$(PY) -m amodal3d bench speed $(if $(EXP),--exp $(EXP)) $(OVERRIDES)

bench-recon-step: setup
	$(PY) -m amodal3d.bench.recon_step $(if $(EXP),--exp $(EXP)) $(OVERRIDES)

bench-loader: setup
	$(PY) -m amodal3d bench loader $(OVERRIDES)

bench-raster: setup
	$(PY) -m amodal3d bench raster $(OVERRIDES)

bench-crops: setup
	$(PY) -m amodal3d bench crops $(if $(EXP),--exp $(EXP)) $(OVERRIDES)

bench-hardest: setup
	$(PY) -m amodal3d bench hardest $(OVERRIDES)

bench-recon: setup
	$(PY) -m amodal3d bench recon $(OVERRIDES)

bench-detections: setup
	$(PY) -m amodal3d bench detections $(if $(EXP),--exp $(EXP)) $(OVERRIDES)

sheets: setup
	$(PY) -m amodal3d sheets $(CFG_ARGS) $(OVERRIDES)

stages: setup
	$(PY) -m amodal3d stages

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir runs --port $(PORT)

clean:
	rm -rf .pytest_cache bench/tb

# make slurm STAGE=recon NODES=2 GPUS=4 TIME=04:00:00 PARTITION=gpu [SWEEP=file] [DRY=1]
NODES ?= 1
GPUS ?= 1
TIME ?= 24:00:00
PARTITION ?=
SWEEP ?=
DRY ?=
slurm: setup
	$(PY) -m amodal3d slurm --stage $(STAGE) $(CFG_ARGS) --nodes $(NODES) --gpus $(GPUS) --time $(TIME) \
		$(if $(PARTITION),--partition $(PARTITION)) $(if $(SWEEP),--sweep $(SWEEP)) $(if $(DRY),--dry-run) $(OVERRIDES)

# make predict INPUT="img.png|folder|coco.json" OUT=predictions [CKPT=path.ckpt] [EXP=name]
INPUT ?=
OUT ?= predictions
CKPT ?=
.PHONY: predict
predict: setup
	@test -n "$(INPUT)" || { echo "usage: make predict INPUT=<images, folder or COCO json> OUT=<folder> [CKPT=<ckpt>]"; exit 2; }
	$(PY) -m amodal3d predict --input $(INPUT) --out $(OUT) $(if $(CKPT),--ckpt $(CKPT)) $(if $(EXP),--exp $(EXP))

# make export OUT=<folder> [EXP=name | ROOT=<dataset folder>] [SPLITS="train val test"] [FORCE=1]
# (a built dataset as PNG images + COCO-style amodal JSON per split; docs/data.md, "Export")
ROOT ?=
SPLITS ?=
FORCE ?=
.PHONY: export
export: setup
	@test "$(origin OUT)" = "command line" -o "$(origin OUT)" = "environment" || { echo "usage: make export OUT=<folder> [EXP=<name> | ROOT=<dataset folder>] [SPLITS=\"train val\"] [FORCE=1]"; exit 2; }
	$(PY) -m amodal3d export --format coco_amodal --out $(OUT) $(if $(ROOT),--root $(ROOT),$(CFG_ARGS)) \
		$(if $(SPLITS),--splits $(SPLITS)) $(if $(FORCE),--force) $(OVERRIDES)
