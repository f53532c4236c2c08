# The two commands of the README. Each one sets up everything it needs (infra/bootstrap.sh).
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: run test bootstrap airflow clean

run: ## the main job, end to end, on embedded defaults
	@bin=$$(bash infra/bootstrap.sh) && PATH="$$bin:$$PATH" $(PY) -m memstream.cli demo

test: ## the whole test suite against real services
	@bin=$$(bash infra/bootstrap.sh) && PATH="$$bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

bootstrap:
	@bash infra/bootstrap.sh >/dev/null

clean:
	rm -rf .venv build dist *.egg-info
