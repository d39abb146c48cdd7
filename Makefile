# Every target works on a fresh clone: `make test` and `make demo` install first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean constraints check-floors

install: $(STAMP)

# Every version pinned by constraints.txt (torch/torchvision: the builds that lie on this
# machine's disk, CUDA builds that also run on CPU); pyproject.toml keeps minimum versions only.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Everything, subprocess and end-to-end tests included (what CI runs).
test: install
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests marked slow, one process per core (one thread
# each), under a minute on 2 cores.
test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow" -n auto

lint: install
	$(BIN)/ruff check src tests benchmarks tools

clean:
	rm -rf $(VENV) $(FLOORS) outputs .pytest_cache

# After upgrading packages in .venv on purpose: record the versions make install pins.
constraints: install
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip list --format=freeze --exclude-editable | grep -v -E '^(fsre|pip==)'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

# The floors of pyproject.toml at work: a separate environment with every dependency at its
# minimum version (tools/floor_constraints.py; torch/torchvision stay at the local builds), the
# fast tests and one end-to-end sweep. Not part of `make test`: it installs a second environment.
FLOORS := .venv-floors
check-floors:
	rm -rf $(FLOORS)
	$(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/python tools/floor_constraints.py > $(FLOORS)/floors.txt
	$(FLOORS)/bin/pip install -c $(FLOORS)/floors.txt -e . pytest pytest-xdist
	OMP_NUM_THREADS=1 $(FLOORS)/bin/python -m pytest -q -p no:cacheprovider -n auto -m "not slow"
	$(FLOORS)/bin/python -m pytest -q -p no:cacheprovider tests/test_experiments.py \
		-k ablation_h_smoke_sweep

# A short training run on the built-in synthetic scenes; extra Hydra overrides via ARGS="...".
demo: install
	$(BIN)/python -m fsre_lightning.train +experiment=demo $(ARGS)
