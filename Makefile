# napari-medseg: two commands for a new user.
#   make demo   install into .venv and open napari with the synthetic CT and the widgets
#   make test   install what the tests need (Xvfb too) and run the whole suite
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: an unpinned torch (or one pulled in by a dependency) downloads a
# multi-GB CUDA build. The pin alone does not stop that (PyPI's Linux wheels of 2.13.0 are
# the CUDA builds): torch comes from its CPU index when that index answers, else from
# pip's own configuration (this project's machines serve a CPU wheel from local disk and
# reach no other index). TORCH_INDEX=URL picks an index; TORCH_INDEX= (empty) uses pip's.
TORCH_PIN := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= auto
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# What napari's Qt needs under a virtual X server (Debian names).
XVFB_DEBS := xvfb xauth libxkbcommon-x11-0 libxcb-icccm4 libxcb-keysyms1 libxcb-randr0 \
	libxcb-render-util0 libxcb-xinerama0 libxcb-xinput0 libxcb-shape0 libxcb-xfixes0 \
	libxcb-cursor0 libgl1 libegl1 libfontconfig1 libdbus-1-3

.PHONY: help demo test test-oldest install_torch_into install install-test xvfb-deps benchmark clean

help:
	@echo "make demo   open napari with the synthetic CT sample and the napari-medseg widgets"
	@echo "make test   install test dependencies (Xvfb, .venv) and run pytest under Xvfb"
	@echo "make test-oldest  the suite against the oldest dependency versions allowed"
	@echo "make benchmark  run the four benchmarks, JSON into benchmarks/results/"
	@echo "make clean  remove .venv and build leftovers"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Stamps re-run the install when pyproject.toml changes.
define install_torch
	@index="$(TORCH_INDEX)"; \
	if [ "$$index" = auto ]; then \
	  index=; \
	  if timeout 15 $(BIN)/python -c "import urllib.request as u; \
	u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" >/dev/null 2>&1; then \
	    index=$(TORCH_CPU_INDEX); \
	  fi; \
	fi; \
	echo "$(BIN)/pip install $(TORCH_PIN)$${index:+ --index-url $$index}"; \
	$(BIN)/pip install $(TORCH_PIN) $${index:+--index-url $$index}
endef

$(VENV)/.installed-gui: pyproject.toml | $(BIN)/python
	$(install_torch)
	$(BIN)/pip install -e ".[gui]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(install_torch)
	$(BIN)/pip install -e ".[testing]"
	touch $@ $(VENV)/.installed-gui

install: $(VENV)/.installed-gui
install-test: $(VENV)/.installed-test

xvfb-deps:
	@# ldconfig lives in /sbin, outside a normal user's PATH on Debian: every run asked sudo
	@export PATH="$$PATH:/usr/sbin:/sbin"; \
	if command -v Xvfb >/dev/null && ldconfig -p | grep -q libxcb-cursor.so.0 \
	    && ldconfig -p | grep -q libxkbcommon-x11; then \
	  echo "Xvfb and Qt's X libraries are present"; \
	else \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(XVFB_DEBS); \
	fi

demo: install
	$(BIN)/napari-medseg demo

# Two pytest workers (pytest-xdist), each with its own Xvfb: on this project's two-core CI
# machine the suite takes 6.5–9.5 minutes (with the load on the machine) instead of
# 11.5 in one process.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: xvfb-deps install-test
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# The same suite against the oldest versions pyproject.toml allows (napari 0.5, numpy
# 1.25 …, .ci/oldest-constraints.txt), in its own venv from a non-editable install: the
# range the package declares, tested. Not part of `make test` (it doubles the time).
OLD := .venv-oldest
test-oldest: xvfb-deps
	test -x $(OLD)/bin/python || $(PYTHON) -m venv $(OLD)
	$(OLD)/bin/pip install -q --upgrade pip
	$(MAKE) --no-print-directory install_torch_into BIN=$(OLD)/bin
	$(OLD)/bin/pip install -c .ci/oldest-constraints.txt ".[testing]"
	$(OLD)/bin/python -m pytest -n $(TEST_WORKERS)

install_torch_into:
	$(install_torch)

# Figures for the README: one JSON object per script (see benchmarks/README.md).
benchmark: install
	$(BIN)/pip install -e ".[benchmark]"
	@set -e; for b in segment classify detect generate; do echo "== $$b"; \
	  $(BIN)/python benchmarks/bench_$$b.py > benchmarks/results/$$b.json.tmp; \
	  mv benchmarks/results/$$b.json.tmp benchmarks/results/$$b.json; \
	  tail -c 400 benchmarks/results/$$b.json; echo; done

clean:
	rm -rf $(VENV) $(OLD) build dist .pytest_cache
