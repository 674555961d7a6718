# Sightline: `make run` serves the demo, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PORT ?= 8000
REDIS_URL ?= redis://127.0.0.1:6379/0
SIGHTLINE_DEMO_PASSWORD ?= sightline-demo
export REDIS_URL SIGHTLINE_DEMO_PASSWORD

.PHONY: run test test-gpu typecheck contract lint format bench browser-deps dicom-deps deploy-deps drill clean vendor-onnxruntime-web

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

run: export DJANGO_SETTINGS_MODULE = config.settings.local
run: $(VENV)/.runtime
	@mkdir -p var
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py build_demo_model
	$(BIN)/python manage.py build_screening_model
	$(BIN)/python manage.py seed_demo
	@redis_port=$$($(BIN)/python -c "from urllib.parse import urlsplit; print(urlsplit('$(REDIS_URL)').port or 6379)"); \
	if $(BIN)/python -c "import redis; redis.Redis.from_url('$(REDIS_URL)', socket_connect_timeout=1).ping()" 2>/dev/null; then \
	  processes="web worker-interactive worker-bulk beat dicom"; echo "Redis: using the one answering on $(REDIS_URL)"; \
	else \
	  processes="redis web worker-interactive worker-bulk beat dicom"; redis_server=$$(command -v redis-server || echo $(BIN)/redis-server); \
	  echo "Redis: starting $$redis_server on port $$redis_port"; \
	fi; \
	echo; \
	echo "  Sightline → http://127.0.0.1:$(PORT)/   (API docs: http://127.0.0.1:$(PORT)/api/v1/docs/)"; \
	echo "  Demo General:    clinician, viewer, hospital-admin, auditor"; \
	echo "  Demo Children's: clinician-b"; \
	echo "  Password for all: $(SIGHTLINE_DEMO_PASSWORD)"; \
	echo "  DICOM (C-STORE SCP) → 127.0.0.1:$${SIGHTLINE_DICOM_PORT:-11112}: called AE SL_GENERAL (Demo General) or SL_CHILDRENS; node DEMO_MODALITY@127.0.0.1"; \
	echo "  Processes: $$processes (platform/Procfile)"; \
	echo "  Ctrl-C stops everything started here."; \
	echo; \
	PATH="$(BIN):$$PATH" REDIS_SERVER=$$redis_server REDIS_PORT=$$redis_port WEB_PORT=$(PORT) \
	  exec $(BIN)/honcho --no-colour -f platform/Procfile -d . start $$processes

browser-deps:
	@test -x /usr/bin/chromium || { \
	  echo "Installing Debian's chromium for the browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

# The DICOM peers the tests talk to (issue 15): Orthanc with its DICOMweb plugin, DCMTK's tools.
dicom-deps:
	@test -x /usr/sbin/Orthanc -a -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so -a -x /usr/bin/storescu || { \
	  echo "Installing Debian's orthanc, orthanc-dicomweb and dcmtk for the DICOM tests"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dcmtk >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dcmtk >/dev/null; fi; }

# The deployment peers (issue 16): nginx in front, promtool for the alert rules, age for the
# encrypted backups, buildah for the image.
deploy-deps:
	@test -x /usr/sbin/nginx -a -x /usr/bin/promtool -a -x /usr/bin/age -a -x /usr/bin/buildah || { \
	  echo "Installing Debian's nginx, prometheus (promtool), age and buildah for the deployment tests"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx prometheus age buildah >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx prometheus age buildah >/dev/null; fi; }

test: export DJANGO_SETTINGS_MODULE = config.settings.test
test: $(VENV)/.dev browser-deps dicom-deps deploy-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@$(MAKE) --no-print-directory typecheck
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/python -m pytest -m "not browser and not gpu and not contract and not multihost"
	# Playwright gets a process of its own: async tests after it in one process fail. The browser
	# suite and the OpenAPI contract (schemathesis against a live server, a few minutes) prove the
	# same on either database: CI's PostgreSQL pass (SIGHTLINE_CI_PASS=postgres) leaves them to
	# the SQLite pass; tests/conftest.py splits the heavy e2e tests the same way.
	@if [ "$$SIGHTLINE_CI_PASS" = postgres ]; then echo "browser suite and contract: in CI's SQLite pass"; \
	else $(BIN)/python -m pytest -m "browser and not gpu" && $(BIN)/python -m pytest -m contract tests/contract; fi

# The multi-host drill (tests/drill/): platform/multihost.sh brings up two web replicas behind nginx,
# the worker host, beat, the DICOM receiver, PostgreSQL, Redis and S3 in network namespaces, and the
# test kills hosts under load. Its own CI step, once (.ci/run).
drill: export DJANGO_SETTINGS_MODULE = config.settings.test
drill: $(VENV)/.dev deploy-deps
	$(BIN)/python -m pytest -m multihost tests/drill

test-gpu: export DJANGO_SETTINGS_MODULE = config.settings.test
test-gpu: $(VENV)/.dev
	$(BIN)/python -m pytest -m gpu

# mypy over the engine and the services (pyproject.toml's [tool.mypy] names them); torch is not read,
# and .mypy_cache keeps a run after the first to a few seconds
typecheck: export DJANGO_SETTINGS_MODULE = config.settings.test
typecheck: $(VENV)/.dev
	$(BIN)/mypy

# The OpenAPI contract: schemathesis (all checks, all phases) against a live server, a few minutes.
contract: export DJANGO_SETTINGS_MODULE = config.settings.test
contract: $(VENV)/.dev
	$(BIN)/python -m pytest -m contract tests/contract

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf var

BENCH_ARGS ?=

# A benchmark, not a test: issue 12's tables and goals (bench/results.json), int8 against fp32
# (bench/optimised.json), nginx with two web replicas against one (bench/nginx.json), then the worklist, audit, bulk-job and DICOM SCP benchmarks. `make bench BENCH_ARGS=--quick`
# is the smoke run of bench/run.py and bench/optimised.py alone (under 6 min).
bench: $(VENV)/.dev
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/optimised.py $(findstring --quick,$(BENCH_ARGS))
	$(BIN)/python bench/nginx.py $(findstring --quick,$(BENCH_ARGS))
ifeq ($(findstring --quick,$(BENCH_ARGS)),)
	$(BIN)/python bench/worklist.py
	$(BIN)/python bench/audit.py
	$(BIN)/python bench/job.py
	$(MAKE) --no-print-directory dicom-deps
	$(BIN)/python bench/dicom_scp.py
	$(MAKE) --no-print-directory browser-deps
	$(BIN)/python bench/screening_browser.py
	$(BIN)/python bench/screening_routing.py
endif

# ONNX Runtime Web for the browser screen (issue 17), vendored so that `make run` needs no Node:
# the wasm-only build (ort.wasm.min.js, with the source map it names: collectstatic's manifest storage
# refuses a file naming a map it cannot find), its Emscripten loader and the SIMD+threads WebAssembly.
# Refreshes them from the npm registry at the pinned version, checks the tarball against the
# registry's sha512 and writes SHA256SUMS (tests/unit/test_vendored_onnxruntime.py checks it).
ORT_WEB_VERSION = 1.30.0
ORT_WEB_INTEGRITY = sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ==
ORT_WEB_DIR = templates/static/vendor/onnxruntime-web
ORT_WEB_FILES = ort.wasm.min.js ort.wasm.min.js.map ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm
vendor-onnxruntime-web:
	@set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  curl -fsSL "https://registry.npmjs.org/onnxruntime-web/-/onnxruntime-web-$(ORT_WEB_VERSION).tgz" -o "$$tmp/ort.tgz"; \
	  got="sha512-$$(openssl dgst -sha512 -binary "$$tmp/ort.tgz" | base64 -w0)"; \
	  test "$$got" = "$(ORT_WEB_INTEGRITY)" || { echo "onnxruntime-web $(ORT_WEB_VERSION): the tarball's sha512 is not the pinned one"; exit 1; }; \
	  tar -xzf "$$tmp/ort.tgz" -C "$$tmp" $(addprefix package/dist/,$(ORT_WEB_FILES)) package/package.json; \
	  mkdir -p $(ORT_WEB_DIR); \
	  for f in $(ORT_WEB_FILES); do cp "$$tmp/package/dist/$$f" $(ORT_WEB_DIR)/; done; \
	  (cd $(ORT_WEB_DIR) && sha256sum $(ORT_WEB_FILES) > SHA256SUMS); \
	  echo "$(ORT_WEB_VERSION)" > $(ORT_WEB_DIR)/VERSION; \
	  echo "onnxruntime-web $(ORT_WEB_VERSION) vendored in $(ORT_WEB_DIR)"
