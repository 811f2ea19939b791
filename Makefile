# Two commands do all the set-up: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The install also compiles the shard's per-fix path (setup.py); an edit to a shard module
# compiles it again before the next demo, test or bench.
BUILT := $(VENV)/.compiled

.PHONY: demo test bench lock clean

$(STAMP): pyproject.toml setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP) $(BUILT)

$(BUILT): $(STAMP) $(wildcard shard/*.py shard/devices/*.py)
	$(BIN)/python setup.py --quiet build_ext --inplace
	@touch $(BUILT)

demo: $(BUILT)
	$(BIN)/python -m scripts.demo

test: $(BUILT)
	$(BIN)/python -m pytest -n auto

bench: $(BUILT)
	$(BIN)/python -m scripts.bench

# requirements.lock: what the image installs (Dockerfile), exact versions with the hashes of
# every file of each (so any platform's wheel verifies), resolved for the image's Python 3.11
# on Linux x86_64 whatever machine runs this. Run after changing pyproject's dependencies.
LOCK_TOOL := uv==0.13.9
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet '$(LOCK_TOOL)'
	$(BIN)/python -m uv pip compile pyproject.toml requirements-build.in --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command "make lock" -o requirements.lock

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build shard/compiled.json
	find shard -name '*.so' -delete -o -name '*.c' -delete
