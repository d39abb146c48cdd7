# Every target works on a fresh clone: `make test` and `make demo` install first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Python's bytecode cache (and pytest's cache of rewritten test modules) stays on where the
# environment turns it off (PYTHONDONTWRITEBYTECODE=1, as on this project's machines): without
# it every test worker, and every command a test starts, compiles the package and the tests
# again (make test-fast 54-60 s instead of 49-52 s on 2 cores, 2026-12-07). __pycache__ is
# git-ignored.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install test test-fast lint demo clean constraints check-floors gpu-carry

install: $(STAMP)

# Every version pinned by constraints.txt (torch/torchvision: the builds that lie on this
# machine's disk, CUDA builds that also run on CPU); pyproject.toml keeps minimum versions only.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Everything, subprocess and end-to-end tests included (what CI runs): one pytest-xdist
# worker per core, one thread each (a worker's subprocesses too), the longest tests first
# (tests/conftest.py); under 10 minutes on 2 cores.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadgroup

# The inner loop: everything but the tests marked slow, the same way; under a minute on 2
# cores.
test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow" -n auto --dist loadgroup

lint: install
	$(BIN)/ruff check src tests benchmarks tools

clean:
	rm -rf $(VENV) $(FLOORS) outputs .pytest_cache .carry

# What benchmarks/gpu_session.sh needs on a lent GPU machine whose Python lacks some packages
# and reaches no registry: pure-Python copies of hydra, omegaconf, antlr4 and kornia, the
# cp312 kornia_rs wheel, and the published code (REF=<a checkout of hyBlue/FSRE-Depth>).
gpu-carry: install
	test -n "$(REF)" || { echo "make gpu-carry REF=<checkout of hyBlue/FSRE-Depth>"; exit 2; }
	rm -rf .carry && mkdir -p .carry/site .carry/whl .carry/FSRE-Depth
	site=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
		cp -r $$site/hydra $$site/omegaconf $$site/antlr4 $$site/kornia .carry/site/
	find .carry/site -name __pycache__ -type d -prune -exec rm -rf {} +
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_17_x86_64 -d .carry/whl \
		kornia_rs==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('kornia_rs'))")
	cp -r $(REF)/. .carry/FSRE-Depth/ && rm -rf .carry/FSRE-Depth/.git
	du -sh .carry

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
