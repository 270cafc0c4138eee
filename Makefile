# Liberty Reach Signaling — developer commands.  `make run` and `make test` install what
# they need first (a virtualenv in .venv; redis-server through apt-get when missing).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ADDR   ?= :8080
WORKERS ?= 1
# A development secret, generated once and kept out of git.  Never use it in production.
DEV_SECRET_FILE := .dev-secret

.PHONY: install run token test test-fast lint fmt redis-server clean build-prod

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

## test: every test (core, Redis on a private redis-server, end-to-end server processes)
test: install redis-server
	$(BIN)/python -m pytest -q

## test-fast: the core unit tests only (no Redis, no processes)
test-fast: install
	$(BIN)/python -m pytest -q tests/core

lint: install
	$(BIN)/ruff check service tests
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff check --fix service tests

build-prod: install
	$(BIN)/pip wheel --no-deps -w dist .

clean:
	rm -rf $(VENV) dist build *.egg-info .pytest_cache .mypy_cache .ruff_cache
