# Every target works on a fresh clone: `make test` and `make demo` install first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean constraints

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
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache

# After upgrading packages in .venv on purpose: record the versions make install pins.
constraints: install
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^fsre'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

# A short training run on the built-in synthetic scenes; extra Hydra overrides via ARGS="...".
demo: install
	$(BIN)/python -m fsre_lightning.train +experiment=demo $(ARGS)
