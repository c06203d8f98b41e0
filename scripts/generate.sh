#!/usr/bin/env bash
# Writes generated/ from protos/: messages, gRPC stubs and type stubs, importable
# as `tally.v1` once generated/ is a source root. The only writer of generated/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# The mypy plugins are scripts next to the interpreter.
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"

rm -rf generated/tally
mkdir -p generated/tally/v1
"$PY" -m grpc_tools.protoc \
  -I protos \
  --python_out=generated \
  --grpc_python_out=generated \
  --mypy_out=generated \
  --mypy_grpc_out=generated \
  protos/tally/v1/*.proto
# Regular packages, so that setuptools' find_packages picks them up.
: > generated/tally/__init__.py
: > generated/tally/v1/__init__.py
: > generated/tally/v1/py.typed
