# seqguard — `make run` serves the default model, `make test` runs every test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c .constraints.txt
DATA   := ../shared/data
BASE   := $(VENV)/.installed-base
STAMP  := $(VENV)/.installed

.PHONY: venv test lint browser model bench run clean

# The service's own set (no PyTorch): what `make run` needs.
$(BASE): pyproject.toml .constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $(BASE)

# Training, tests and benchmarks on top of it.
$(STAMP): $(BASE)
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[train,dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check app model_export tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

test: lint browser
	$(VENV)/bin/pytest -q

# The headless-browser test of /docs needs Debian's chromium and its driver: installed
# here when missing and this is a root shell with apt-get; otherwise the test is skipped.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	    && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	    >/dev/null; } || echo "chromium or chromedriver missing: tests/e2e/test_e2e_docs_browser.py will be skipped"

# Rebuilds the shipped default bundle from both real Taobao samples (split by user; the
# test users of both are the report's held-out real traffic), every scenario injected.
model: $(STAMP)
	$(VENV)/bin/seqguard train --events $(DATA)/taobao_userbehavior/UserBehavior_head_84k.csv.gz \
	    --events $(DATA)/taobao_userbehavior/UserBehavior_flink_course_slice_110k.csv.gz \
	    --format taobao --inject all --arch transformer --seed 7 --out runs/default
	$(VENV)/bin/seqguard export runs/default --out app/bundles/default --fp16 --int8 --force

# Benchmarks print figures (docs/PERFORMANCE.md); they assert nothing about time.
bench: $(STAMP)
	$(PY) tests/benchmarks/bench_features.py
	$(PY) tests/benchmarks/bench_parse.py
	$(PY) tests/benchmarks/bench_score.py
	$(PY) tests/benchmarks/bench_precision.py
	$(PY) tests/benchmarks/bench_explain.py
	$(PY) tests/benchmarks/bench_onnx.py
	$(PY) tests/benchmarks/bench_service.py
	$(PY) tests/benchmarks/bench_backfill_stall.py
	$(PY) tests/benchmarks/bench_redis_footprint.py
	$(PY) tests/benchmarks/bench_hdfs.py

# The service on the shipped default bundle, with an embedded Redis, at 127.0.0.1:8000.
run: $(BASE)
	$(VENV)/bin/seqguard serve

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
