# The two commands of the quick start, `make serve` and `make test`, each set up
# .venv themselves on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-sqlite generate check-generated lint bench release-contract clean

$(STAMP): pyproject.toml clients/pyproject.toml
	@echo "setting up $(VENV) (first run, or pyproject.toml changed): a minute or two"
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./clients -e '.[dev]'
	touch $(STAMP)

# The dashboard and the proxy on loopback too: the ready line names their addresses.
serve: $(STAMP)
	$(BIN)/tally serve --web-listen 127.0.0.1:8080 --proxy-listen 127.0.0.1:8090 $(ARGS)

# On SQLite always; on PostgreSQL too when it answers at TALLY_TEST_POSTGRES_URL
# (default postgresql+asyncpg://postgres@127.0.0.1:5432/test). With CI=true a
# missing PostgreSQL fails the run instead of skipping. Two pytest-xdist workers, a test
# file to each at a time (its servers are its own): most tests wait on processes and
# databases, so two take 6 minutes where one took 11. Then, with nothing beside them, the
# tests marked `alone`, whose bounds (memory, a normal call's latency under hostile load)
# are the machine's to measure. Exit 5 is pytest's "no test selected" (ARGS naming tests
# of one kind only).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not alone" $(ARGS) || test $$? -eq 5
	$(BIN)/python -m pytest -m alone $(ARGS) || test $$? -eq 5

generate: $(STAMP)
	PYTHON=$(BIN)/python scripts/generate.sh

# generated/ (Python, Go, TypeScript) is exactly what `make generate` writes from protos/.
check-generated: generate
	git diff --exit-code -- generated && test -z "$$(git status --porcelain -- generated)"

# The contract (buf lint, format, and no breaking change against the last released
# contract, protos/released.binpb), the server's layers (import-linter), the Python code
# (ruff: rules and format) and its types (mypy --strict).
lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --exit-code --diff
	$(BIN)/buf breaking --against protos/released.binpb
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

# When a version is cut: the contract as released becomes the baseline `buf breaking` holds to.
release-contract: $(STAMP)
	$(BIN)/buf build -o protos/released.binpb

clean:
	rm -rf $(VENV) *.egg-info
