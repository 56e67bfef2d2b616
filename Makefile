# Two commands on a fresh machine: `make test` and `make quickstart`.
# The environment lives in .venv and is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of PyTorch that this machine keeps on disk; GPU clusters install their own CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: test quickstart venv browser bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	touch $@

# The browser test drives Debian's chromium; CI runs as root, so a fresh machine installs it here.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "note: chromium is not installed; tests/test_playground.py will be skipped"

test: venv browser
	$(PY) -m pytest tests

quickstart: venv
	$(VENV)/bin/ddpm quickstart

bench: venv
	$(PY) -m pip install -q -e ".[bench]" "$(TORCH)"
	$(PY) benchmarks/core.py

clean:
	rm -rf $(VENV) .ddpm quickstart-samples.png
