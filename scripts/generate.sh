#!/usr/bin/env bash
# Writes clients/generated/ from protos/: messages, gRPC stubs and type stubs, importable
# as `tally.v1` once clients/generated/ is a source root. The only writer of clients/generated/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# The mypy plugins are scripts next to the interpreter.
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"

rm -rf clients/generated/tally
mkdir -p clients/generated/tally/v1
"$PY" -m grpc_tools.protoc \
  -I protos \
  --python_out=clients/generated \
  --grpc_python_out=clients/generated \
  --mypy_out=clients/generated \
  --mypy_grpc_out=clients/generated \
  protos/tally/v1/*.proto
# Regular packages, so that setuptools' find_packages picks them up.
: > clients/generated/tally/__init__.py
: > clients/generated/tally/v1/__init__.py
: > clients/generated/tally/v1/py.typed
