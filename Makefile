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
	touch $@

setup: $(BIN)/.installed

# Until `splitinfer demo` exists (issue 8): profile resnet18 as an edge (1 thread) and a
# cloud (2 threads), and print the plan for a 4G uplink with the bandwidth envelope.
demo: setup
	mkdir -p out
	$(BIN)/splitinfer profile --model resnet18 --threads 1 --out out/resnet18-edge.json
	$(BIN)/splitinfer profile --model resnet18 --threads 2 --out out/resnet18-cloud.json
	$(BIN)/splitinfer partition --model resnet18 --edge-profile out/resnet18-edge.json \
		--cloud-profile out/resnet18-cloud.json --bandwidth 5.85 --rtt 20 --envelope

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
