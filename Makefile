# migraine-node: the two set-up commands of the README.
#   make demo  - install into .venv and run the node with embedded defaults
#   make test  - install what the tests need (apt + pip) and run the suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := dcmtk dicom3tools orthanc
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install install-test apt bench clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(PY)
	$(PY) -m pip install -e .

install-test: $(PY) apt
	$(PY) -m pip install -e '.[test]'

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $$missing; \
	fi

demo: install
	$(VENV)/bin/migraine-node demo --config deploy/config.demo.toml

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) migraine-node-data .pytest_cache
