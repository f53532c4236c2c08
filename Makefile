# The two commands of the README. Each one sets up everything it needs (infra/bootstrap.sh
# installs the Python dependencies and fetches Kafka, Prism and Flink), then runs inside a
# private network namespace with loopback only (infra/isolated.sh).
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: run test bootstrap clean

run: ## the main job, end to end, on embedded defaults
	@bin=$$(bash infra/bootstrap.sh) && PATH="$$bin:$$PATH" bash infra/isolated.sh $(PY) -m memstream.cli demo $(ARGS)

test: ## the whole test suite against real services
	@bin=$$(bash infra/bootstrap.sh) && PATH="$$bin:$$PATH" bash infra/isolated.sh $(PY) -m pytest $(PYTEST_ARGS)

bootstrap:
	@bash infra/bootstrap.sh >/dev/null

clean:
	rm -rf .venv build dist *.egg-info
