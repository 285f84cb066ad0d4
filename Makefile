# Two set-up commands (see README): `make demo` runs the main job, `make test` passes the tests.
# Both create ./.venv on first use and install torch 2.13.0 *before* the package, so pip takes
# the CPU wheel instead of resolving a multi-GB CUDA build.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.effcompile-installed
DEMO_OUT ?= runs/demo

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Plain backprop vs decorrelated backprop on the bundled digits data, 3 seeds, MLP then CNN.
demo: $(STAMP)
	$(VENV)/bin/effcompile train --model mlp --passes decorrelation --pass-arg decorrelation.lr=0.01 \
		--compare --epochs 8 --batch-size 32 --lr 0.01 --seeds 0,1,2 --target-accuracy 0.95 \
		--out $(DEMO_OUT)/mlp --no-progress
	$(VENV)/bin/effcompile train --model cnn --passes decorrelation --pass-arg decorrelation.lr=0.01 \
		--compare --epochs 6 --batch-size 32 --lr 0.01 --seeds 0,1,2 --target-accuracy 0.97 \
		--out $(DEMO_OUT)/cnn --no-progress

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info
