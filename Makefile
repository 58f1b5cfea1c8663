# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: test demo bench clean

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

clean:
	rm -rf $(VENV) lightning_logs demo_logs .pytest_cache
