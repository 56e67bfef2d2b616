# Two commands on a fresh machine: `make test` and `make quickstart`.
# The environment lives in .venv and is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of PyTorch that this machine keeps on disk; GPU clusters install their own CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: test quickstart venv browser monitoring bench clean

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

# promtool (Debian's prometheus package) lints GET /metrics and checks deploy/monitoring/prometheus.yml in
# tests/deploy/test_operations.py; installed the same way.
monitoring:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
		|| echo "note: promtool is not installed; its checks in tests/deploy/test_operations.py will be skipped"

test: venv browser monitoring
	$(PY) -m pytest tests

quickstart: venv
	$(VENV)/bin/ddpm quickstart

bench: venv
	$(PY) -m pip install -q -e ".[bench]" "$(TORCH)"
	$(PY) benchmarks/core.py

clean:
	rm -rf $(VENV) .ddpm quickstart-samples.png
