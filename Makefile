# Set-up and main targets. Each creates .venv in the repo if missing and installs what it needs.
# On a machine without CUDA, torch is pinned to the local CPU build in the same pip command
# (an unpinned torch pulls a multi-GB CUDA stack). Never install torchvision here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vpstudy-installed
TORCH  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: demo test bench-recording clean-venv

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" -e ".[test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/vpstudy demo

test: $(STAMP)
	$(VENV)/bin/ruff check vpstudy kernels
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

bench-recording: $(STAMP)
	$(PY) -m vpstudy.bench.recording

clean-venv:
	rm -rf $(VENV)
