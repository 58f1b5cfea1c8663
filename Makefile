# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: test test-oldest demo bench stability gpu-check dist clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=10

demo: $(STAMP)
	$(PY) examples/demo.py

# the reference packages the benchmark compares against (not dependencies of gradclip_plugin)
$(BENCH_STAMP): $(STAMP) benchmarks/requirements.txt
	$(PY) -m pip install -q -c constraints.txt -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/bench.py

# A small byte-level transformer on the Python standard library's source, learning rate too high, once per
# clipping rule (same seed and batches): validation loss, loss spikes, skipped steps, ms/step, docs/stability.png
stability: $(STAMP)
	$(PY) benchmarks/stability.py

# The oldest versions the package declares (pyproject.toml's floors), in a venv of their own beside the
# pinned torch: `make test-oldest` runs the namespace and callback tests against them. Keep them equal
# to the floors. setuptools<82: Lightning before 2.4 imports `pkg_resources`, which setuptools 82 removed.
LIGHTNING_OLDEST ?= 2.1.1
UTILITIES_OLDEST ?= 0.8.0
OLDEST_VENV ?= .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed-$(LIGHTNING_OLDEST)-$(UTILITIES_OLDEST)

$(OLDEST_STAMP): pyproject.toml constraints.txt
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(OLDEST_VENV)/bin/python -m pip install -q -c constraints.txt -e ".[test]" "setuptools<82" \
		"pytorch-lightning==$(LIGHTNING_OLDEST)" "lightning==$(LIGHTNING_OLDEST)" "lightning-utilities==$(UTILITIES_OLDEST)"
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pytest -q -p no:xdist tests/test_namespaces.py tests/callbacks

# On a GPU machine, with the torch and Lightning installed there (no venv, nothing downloaded): the
# CUDA-marked tests and `bench.py --device cuda` in at most 8 minutes, one summary at the end. Without
# CUDA it says so and exits 0. BENCH_ARGS="--quick" shortens the benchmark.
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py --budget 480 $(if $(BENCH_ARGS),--bench-args="$(BENCH_ARGS)")

# The wheel and sdist in dist/, checked by twine; build and twine live in a venv of their own.
DIST_VENV ?= .venv-dist

dist:
	test -x $(DIST_VENV)/bin/python || $(PYTHON) -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/python -m pip install -q build twine
	rm -rf dist build
	$(DIST_VENV)/bin/python -m build --outdir dist .
	$(DIST_VENV)/bin/python -m twine check --strict dist/*

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(DIST_VENV) dist lightning_logs demo_logs .pytest_cache
