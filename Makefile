# Two commands do everything from a fresh clone (see README.md):
#   make table  - the main job: the toy table reproduction (blda reproduce toy), 10-15 min on 2 CPU cores
#   make test   - the whole test suite (export check, notebook tests, pytest)
# Both create and fill the local virtual environment .venv first. `make demo` is a one-minute tour of the core.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# --no-compile: byte-compiling every file of the stack (torch's tests included) was nearly half of a fresh
# install; Python compiles the modules a run imports, once, on first import.
# The stamp changes whenever the pinned requirements or the package metadata change.
STAMP  := $(VENV)/.installed-$(shell cat requirements-test.txt pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0

.PHONY: venv table demo lab test export nbtest pytest benchmark gpu-check docs clean

JOBS ?= 2

venv: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --no-compile --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@

table: venv
	$(BIN)/blda reproduce toy --jobs $(JOBS)

demo: venv
	$(BIN)/blda demo

# JupyterLab on nbs/, the notebooks in reading order; their kernel ("Python 3") is this project's .venv.
# Prints the address with its token; Ctrl-C stops it. LAB_ARGS passes more options (e.g. --no-browser --port 8890).
lab: venv
	$(BIN)/jupyter lab --notebook-dir=nbs $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

test: venv
	@$(MAKE) --no-print-directory export nbtest pytest

# nbs/ is the source of truth: re-exporting must not change blda/.
export: venv
	@before=$$(find blda -name '*.py' | sort | xargs sha1sum | sha1sum); \
	$(BIN)/nbdev-export; \
	after=$$(find blda -name '*.py' | sort | xargs sha1sum | sha1sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "FAIL: blda/ differs from what nbs/ exports. Run 'make export' and commit blda/."; \
	  git status --short -- blda; exit 1; \
	else echo "export check: blda/ matches nbs/"; fi

# Two notebooks at a time, one torch thread each: oversubscribed OpenMP threads are many times slower.
nbtest: venv
	OMP_NUM_THREADS=1 $(BIN)/nbdev-test --n-workers 2 --timing

pytest: venv
	$(BIN)/pytest -q

benchmark: venv
	$(BIN)/blda benchmark

# On a machine with a CUDA GPU: the GPU-only tests (CI has no GPU and skips them) and the GPU benchmark,
# with the static update (the default there) and with the dynamic one.
gpu-check: venv
	$(BIN)/pytest -q tests/test_gpu.py
	$(BIN)/blda benchmark --device cuda
	$(BIN)/blda benchmark --device cuda --no-static

# Static HTML of every notebook (tutorials first) in _docs/, from their saved outputs.
docs: venv
	$(BIN)/blda docs

clean:
	rm -rf $(VENV) .pytest_cache
