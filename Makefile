# django-socketmail — `make demo` shows it working, `make test` proves it.
# Nothing needed but Python 3.10+ and make: both targets build their own virtualenv.
PYTHON ?= python3
VENV ?= .venv
# Newest Django the interpreter supports (5.2 on Python 3.10/3.11, 6.x on 3.12+), unless given.
DJANGO ?= Django>=5.2
BIN := $(abspath $(VENV))/bin

.PHONY: demo test lint pytest interop bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(DJANGO)" -e ".[test,lint]"
	touch $@

## demo: send a test message through a throwaway local SMTP server and show the conversation
demo: $(BIN)/.installed
	cd testproject && $(BIN)/python manage.py migrate --verbosity 0
	cd testproject && $(BIN)/python manage.py sendtestmail --local-server you@example.com

## test: lint, type-check and run the whole suite (real Postfix + Dovecot when installed)
test: lint pytest

# Caches live in the virtualenv: CI runs two of them at once in one checkout (a shared
# .mypy_cache crashed mypy there).
lint: $(BIN)/.installed
	$(BIN)/ruff check --cache-dir "$(VENV)/.ruff_cache" .
	$(BIN)/ruff format --cache-dir "$(VENV)/.ruff_cache" --check .
	$(BIN)/mypy --cache-dir "$(VENV)/.mypy_cache" django_socketmail

pytest: $(BIN)/.installed
	$(BIN)/python -m pytest -o cache_dir="$(VENV)/.pytest_cache"

## interop: only the suite against a real Postfix + Dovecot
interop: $(BIN)/.installed
	$(BIN)/python -m pytest tests/interop -m interop

clean:
	rm -rf .venv .venv310 .venv312 .venv313 .pytest_cache .mypy_cache .ruff_cache *.egg-info testproject/db.sqlite3
