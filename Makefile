# The developer interface; CI runs exactly these targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install dcmtk serve test test-db lint conformance initdb run viewer e2e bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's dcmtk (storescu, findscu, movescu, getscu, echoscu): the DIMSE tests drive the
# archive with it. Installed when missing.
dcmtk:
	command -v storescu >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dcmtk)

# Serves http://127.0.0.1:8080/dicom-web with data under ./data. Environment: DICOMWEB_HOST,
# DICOMWEB_PORT, DICOMWEB_DATA_DIR, DATABASE_URL (none: an embedded PostgreSQL under the data dir).
serve: install
	$(VENV)/bin/dicomweb-server serve

run: serve

initdb: install
	$(VENV)/bin/dicomweb-server initdb

# The whole suite; a real PostgreSQL: DATABASE_URL when set, an embedded one otherwise.
test: install dcmtk
	$(PY) -m pytest -q

# Only the tests that touch the database (CI runs them again against a second server).
test-db: install dcmtk
	$(PY) -m pytest -q -m "db or conformance"

lint: install
	$(VENV)/bin/ruff format --check dicomweb_server tests conformance benchmarks viewer e2e
	$(VENV)/bin/ruff check dicomweb_server tests conformance benchmarks viewer e2e
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Black-box suite against a running server (DICOMWEB_URL, default: `make serve`'s address).
# `make test` runs it too, against a server it starts itself.
conformance: install
	DICOMWEB_URL=$${DICOMWEB_URL:-http://127.0.0.1:8080/dicom-web} $(PY) -m pytest -q conformance

# The OHIF viewer (npm @ohif/app, prebuilt) on http://127.0.0.1:3000, reading DICOMWEB_URL
# (default: `make serve`'s http://127.0.0.1:8080/dicom-web).
viewer: install
	$(PY) viewer/viewer.py

# OHIF in headless Chromium against a fresh archive loaded with sample studies; installs
# Debian's chromium and playwright-core (npm) when missing. Results in e2e/results/.
e2e: install
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	cd e2e && npm install --no-audit --no-fund --silent
	$(PY) e2e/run.py

# Benchmarks (figures are ratios measured in the same run; see docs/benchmarks.md).
# `make bench`: frames vs pydicom, then side by side with Orthanc on a synthesized archive
# (BENCH_INSTANCES = patients x 200; generated once under .bench/).
BENCH_PATIENTS ?= 50
bench: install
	$(PY) benchmarks/frames.py
	test -d .bench/archive-$(BENCH_PATIENTS) || $(PY) ../shared/samples/generate.py .bench/archive-$(BENCH_PATIENTS) --no-coverage --patients $(BENCH_PATIENTS) --studies 2 --series 4 --instances 25 --size 16 --uid-root 1.2.826.0.1.3680043.8.498.7777
	$(PY) benchmarks/vs_orthanc.py --archive .bench/archive-$(BENCH_PATIENTS)
	$(PY) benchmarks/stow.py --archive .bench/archive-$(BENCH_PATIENTS) --workers 2

# Ten minutes of mixed load on a real server; no 5xx, memory bounded (benchmarks/soak.py).
# `make test` runs a shorter one (tests/test_soak.py).
soak: install
	$(PY) benchmarks/soak.py --minutes 10

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
