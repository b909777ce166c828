# The two commands of the README:  `make demo`  and  `make test`.
# Both set up .venv from nothing on a fresh machine first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The local CPU wheel of torch lives here; pinning torch==2.13.0 keeps pip off the CUDA builds.
WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: setup demo test clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(FIND_LINKS) torch==2.13.0
	$(BIN)/pip install -q $(FIND_LINKS) -e '.[test]'
	$(BIN)/pip install -q --no-deps 'timm>=1.0'  # no torchvision: see splitinfer/models/timm_shim.py
	touch $@

setup: $(BIN)/.installed

# A cloud worker and an edge agent on this machine (network namespaces + tc when root),
# a changing link, an outage and a recovery; a summary table and out/demo-timeline.png.
demo: setup
	$(BIN)/splitinfer demo

# -P keeps the checkout off sys.path: the tests import the installed splitinfer, so an
# editable and a plain `pip install .` are tested alike (the checkout's splitinfer/ alone
# has no cloud/ edge/ simulations/ inside: they are mapped in by pyproject.toml).
test: setup
	$(BIN)/python -P -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
