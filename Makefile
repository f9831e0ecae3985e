# One way to do each thing; README and .ci/run call these targets.
PY ?= .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: setup demo test test-unit test-integration chaos lint format bench bench-long up down clean

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e '.[dev]'
	touch $(VENV_STAMP)

setup: $(VENV_STAMP) ## create .venv with everything (torch, celery, flask, seaweedfs, test tools, chromium for the browser tests)
	@command -v redis-server >/dev/null || (apt-get update -q && apt-get install -y -q redis-server)
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	@command -v zip >/dev/null || (apt-get update -q && apt-get install -y -q zip)
	@command -v docker-compose >/dev/null || (apt-get update -q && apt-get install -y -q docker-compose) || echo "docker-compose not installed: compose validation test will be skipped"

demo: setup
	$(PY) -m stack demo

up: setup
	$(PY) -m stack up

down:
	$(PY) -m stack down

test: setup
	$(PY) -m pytest -q --ignore=tests/chaos

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

chaos: setup ## fault tests: kill, stop and restart workers, Redis and S3 (docs/reliability.md)
	$(PY) -m pytest -q tests/chaos

lint: setup ## ruff, and bandit over the service code (findings fixed or justified inline)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/bandit -q -c pyproject.toml -r api worker shared keeper client stack

format: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

bench: setup
	$(PY) -m bench

bench-long: setup
	$(PY) -m bench --long

clean:
	rm -rf .venv run out .pytest_cache .ruff_cache
