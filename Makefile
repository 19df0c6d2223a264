# zkd: every target creates/reuses the virtual environment in .venv and installs the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ZKD    := $(VENV)/bin/zkd
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
OUT    ?= runs/demo

.PHONY: venv dataset test demo bench clean teacher

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# Real Fashion-MNIST (IDX files) from Debian's dataset-fashion-mnist; needs root or sudo.
dataset:
	@test -f $(FMNIST) || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

test: venv dataset
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

# The main job on the shipped teacher: synthesize, then (when available) calibrate a W4A4 student and evaluate it.
demo: venv dataset
	$(ZKD) synthesize --method deepinversion --num-images 64 --batch-size 32 --iterations 200 --out $(OUT)/synth --overwrite
	@if $(ZKD) calibrate --help >/dev/null 2>&1; then \
	  $(ZKD) calibrate --data $(OUT)/synth --bits 4 --out $(OUT)/student.pt && \
	  $(ZKD) evaluate --model $(OUT)/student.pt --data fashion-mnist:test --teacher fmnist_resnet14; fi
	@echo "preview: $(OUT)/synth/preview.png"

bench: venv dataset
	$(PY) bench/run_all.py

teacher: venv dataset
	OMP_NUM_THREADS=1 $(PY) assets/train_teacher.py --out assets/fmnist_resnet14

clean:
	rm -rf runs bench/cache .pytest_cache
