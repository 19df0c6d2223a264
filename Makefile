# zkd: every target creates/reuses the virtual environment in .venv and installs the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ZKD    := $(VENV)/bin/zkd
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
OUT    ?= runs/demo

.PHONY: venv dataset test demo bench bench-gpu clean teacher

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

# The main job on the shipped teacher: synthesize, calibrate a W4A4 student on the images, evaluate it on real data.
demo: venv dataset
	$(ZKD) synthesize --method deepinversion --num-images 64 --batch-size 32 --iterations 200 --out $(OUT)/synth --overwrite
	$(ZKD) calibrate --data $(OUT)/synth --bits 4 --out $(OUT)/student.pt
	$(ZKD) evaluate --model $(OUT)/student.pt --data fashion-mnist:test --teacher fmnist_resnet14
	@echo "preview: $(OUT)/synth/preview.png"

bench: venv dataset
	$(PY) bench/run_all.py

# On a machine with a CUDA GPU: the CUDA tests, the demo on the GPU and the GPU synthesis benchmarks.
bench-gpu: venv dataset
	PY=$(PY) bash bench/gpu.sh

teacher: venv dataset
	OMP_NUM_THREADS=1 $(PY) assets/train_teacher.py --out assets/fmnist_resnet14

clean:
	rm -rf runs bench/cache .pytest_cache
