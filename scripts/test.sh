#!/usr/bin/env bash
# Sets up everything the tests need (peers included) and runs lint, types and the tests.
# Extra arguments go to pytest, e.g. scripts/test.sh -k receive  or  scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
echo "== ruff"; .venv/bin/ruff check dicomnode tests scripts
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest -q "$@"
