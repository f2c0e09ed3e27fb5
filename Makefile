# Every target installs what it needs into .venv first; all are safe to repeat.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench demo proto install clean

# requirements-schemathesis.txt includes requirements-dev.txt, which includes requirements.txt.
$(STAMP): requirements.txt requirements-dev.txt requirements-schemathesis.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-schemathesis.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) app.py

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/run.py

demo: $(STAMP)
	$(PY) demo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

include proto.mk

# -- `make cluster` (owned by the store helper; see README "Running several processes") --------------
# A local redis-server (AOF, fsync on every write, data in .cluster/) and two service processes
# sharing it: HTTP 8081 and 8082, gRPC 9091 and 9092. Ctrl-C stops all three; if one exits, so do the others.
CLUSTER_DIR ?= .cluster
CLUSTER_REDIS_PORT ?= 6390
CLUSTER_REDIS_URL := redis://127.0.0.1:$(CLUSTER_REDIS_PORT)/0

.PHONY: cluster
cluster: SHELL := /bin/bash
cluster: $(STAMP)
	@command -v redis-server >/dev/null || { echo "redis-server not found: apt-get install redis-server"; exit 1; }
	@mkdir -p $(CLUSTER_DIR)
	@trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT; \
	redis-server --port $(CLUSTER_REDIS_PORT) --bind 127.0.0.1 --dir $(abspath $(CLUSTER_DIR)) --daemonize no \
	  --appendonly yes --appendfsync always --save '' --logfile redis.log & \
	until $(PY) -c "import redis; redis.Redis(port=$(CLUSTER_REDIS_PORT)).ping()" 2>/dev/null; do \
	  kill -0 $$! 2>/dev/null || { echo "redis-server did not start: see $(CLUSTER_DIR)/redis.log"; exit 1; }; sleep 0.2; done; \
	echo "Redis on 127.0.0.1:$(CLUSTER_REDIS_PORT) (data in $(CLUSTER_DIR)/)"; \
	$(PY) app.py --http-port 8081 --grpc-port 9091 --redis-url $(CLUSTER_REDIS_URL) & \
	$(PY) app.py --http-port 8082 --grpc-port 9092 --redis-url $(CLUSTER_REDIS_URL) & \
	wait -n
