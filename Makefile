# Two commands do all the set-up: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lock clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m scripts.demo

test: $(STAMP)
	$(BIN)/python -m pytest -n auto

bench: $(STAMP)
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
	rm -rf $(VENV) *.egg-info .pytest_cache
