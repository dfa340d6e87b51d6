# Set-up on a fresh Debian machine: `make demo` and `make test` do everything.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
STAMP   := $(VENV)/.installed
DEBS    := qemu-utils rsync xxhash strace python3-libvmdk python3-libvhdi libvhdi-utils libnbd-bin
APT_STAMP := $(VENV)/.debs
AZURITE_STAMP := .azurite/node_modules/.bin/azurite-blob

.PHONY: install test demo bench proto lint clean docs

install: $(STAMP) $(APT_STAMP) $(AZURITE_STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# External oracles and baselines come from Debian; installed only when missing.
$(APT_STAMP): $(STAMP)
	@missing=""; \
	command -v qemu-img >/dev/null || missing="yes"; \
	command -v rsync >/dev/null || missing="yes"; \
	command -v xxh128sum >/dev/null || missing="yes"; \
	command -v strace >/dev/null || missing="yes"; \
	command -v nbdinfo >/dev/null || missing="yes"; \
	/usr/bin/python3 -c 'import pyvmdk, pyvhdi' 2>/dev/null || missing="yes"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEBS) >/dev/null; \
	fi
	touch $@

# Azurite (Azure Storage emulator) for the page-blob tests: npm, project-local, when missing.
$(AZURITE_STAMP):
	npm install --prefix .azurite azurite@3 --no-audit --no-fund

test: install
	$(BIN)/pytest -q -n 2 --benchmark-skip tests

demo: install
	$(BIN)/replication demo

# pytest-benchmark suites (sync, frames, e2e agents vs a bare relay), then the
# side-by-side report with targets: bench-out/bench.{json,md}
bench: install
	$(BIN)/pytest -q benchmarks --benchmark-only
	$(BIN)/replication bench --size $${BENCH_SIZE:-1G} --out bench-out

proto: install
	$(PYTHON) -m replication.protogen

lint: install
	$(BIN)/ruff check replication agents tests benchmarks
	$(BIN)/ruff format --check replication agents tests benchmarks

docs: install
	$(PYTHON) -c "from replication.errors import render_error_table as r; open('docs/errors.md','w').write(r())"
	$(PYTHON) -c "from replication.orchestrator.diagrams import update; update('docs/orchestrator.md')"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
