# migraine-node: the two set-up commands of the README.
#   make demo  - install into .venv and run the node with embedded defaults
#   make test  - install what the tests need (apt + pip) and run the suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb chromium postgresql
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install install-test apt ohif bench clean fuzz load

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(PY)
	$(PY) -m pip install -e .

install-test: $(PY) apt ohif
	$(PY) -m pip install -e '.[test]'

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $$missing; \
	fi

# The prebuilt OHIF Viewer that node/viewer.py serves (browser tests, `demo --viewer`), pinned by
# OHIF_VERSION in node/viewer.py. `npm pack` fetches only the @ohif/app tarball, whose dist/ is the
# complete static build; `npm install` would also resolve its build-time dependencies, which the
# static build never loads (and which a partial registry mirror may lack). Same resulting path.
OHIF_VERSION := $(shell sed -n 's/^OHIF_VERSION = "\(.*\)"/\1/p' node/viewer.py)
OHIF_DIR := .cache/ohif
OHIF_APP := $(OHIF_DIR)/node_modules/@ohif/app

ohif:
	@if [ -f $(OHIF_APP)/dist/index.html ] && grep -q '"version": "$(OHIF_VERSION)"' $(OHIF_APP)/package.json; then exit 0; fi; \
	set -e; \
	command -v npm >/dev/null 2>&1 || { $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends nodejs npm; }; \
	rm -rf $(OHIF_DIR); mkdir -p $(OHIF_APP); \
	npm pack --silent --pack-destination $(OHIF_DIR) @ohif/app@$(OHIF_VERSION); \
	tar -xzf $(OHIF_DIR)/ohif-app-$(OHIF_VERSION).tgz -C $(OHIF_APP) --strip-components=1 --no-same-owner; \
	rm $(OHIF_DIR)/ohif-app-$(OHIF_VERSION).tgz; \
	test -f $(OHIF_APP)/dist/index.html || { echo "@ohif/app@$(OHIF_VERSION) has no dist/index.html" >&2; exit 1; }

demo: install
	$(VENV)/bin/migraine-node demo --config deploy/config.demo.toml

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(PY) bench/ingest.py

# Ten concurrent senders against the node, DCMTK storescp and Orthanc (bench/load.py; minutes).
load: install-test
	$(PY) bench/load.py

# The long fuzz run of the C-STORE SCP (tests/node/test_fuzz.py): 2,000 seeded mutations, at most 10 minutes.
fuzz: install-test
	FUZZ_CASES=$${FUZZ_CASES:-2000} FUZZ_SECONDS=$${FUZZ_SECONDS:-600} $(PY) -m pytest -q -s tests/node/test_fuzz.py

clean:
	rm -rf $(VENV) migraine-node-data .pytest_cache
