# visionpipe: `make run` trains and registers on the embedded defaults; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
export VISIONPIPE_HOME ?= $(CURDIR)/.visionpipe
# Prefect's ephemeral API database and its result store live in the same state folder.
export PREFECT_HOME ?= $(VISIONPIPE_HOME)/prefect
export PREFECT_RESULTS_PERSIST_BY_DEFAULT ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# The ephemeral API's first start migrates a new SQLite database: about 18 s on 2 cores, close
# to Prefect's 20 s default, past which `make run` fails with "Timed out while attempting to
# connect to ephemeral Prefect API server".
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_LOGGING_LEVEL ?= INFO
export MLFLOW_ENABLE_ASYNC_LOGGING ?= false
# One OpenMP thread per core this process may use: more threads than cores only slow torch down.
export OMP_NUM_THREADS ?= $(shell nproc 2>/dev/null || echo 1)

STAMP := $(VENV)/.installed

.PHONY: install browser run test test-unit bench serve stack-up stack-down clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch and torchvision first, pinned to the builds on this machine's disk (CPU or CUDA wheel).
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[dev]'
	# Prefect's migrations, run once here into an empty database that new state folders copy
	# (flows/prefect_database.py): a first `make run` then skips them.
	$(VENV)/bin/python -m flows.prefect_database
	# The same for MLflow's embedded SQLite store (src/visionpipe/templates.py).
	$(VENV)/bin/python -m visionpipe.templates
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	mkdir -p $(PREFECT_HOME)
	$(VENV)/bin/python -m flows

# The browser tests drive Debian's chromium (Playwright with executable_path, no browser
# download): installed here as root with apt-get; elsewhere this says what to run.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "browser tests need /usr/bin/chromium: run 'sudo apt-get install chromium' (Debian)" >&2; \
	  fi; }

test: $(STAMP) browser
	mkdir -p $(PREFECT_HOME)
	$(VENV)/bin/python -m pytest

test-unit: $(STAMP)
	$(VENV)/bin/python -m pytest tests/unit

stack-up: $(STAMP)
	$(VENV)/bin/python -m deployments.stack up

stack-down: $(STAMP)
	$(VENV)/bin/python -m deployments.stack down

serve: $(STAMP)
	mkdir -p $(PREFECT_HOME)
	$(VENV)/bin/python -m deployments.serve

bench: $(STAMP)
	mkdir -p $(PREFECT_HOME)
	$(VENV)/bin/python bench/trainer.py
	$(VENV)/bin/python bench/photo_loader.py
	$(VENV)/bin/python bench/photo_accuracy.py
	$(VENV)/bin/python bench/style_serving.py

clean:
	rm -rf $(VISIONPIPE_HOME)
