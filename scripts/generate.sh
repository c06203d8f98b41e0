#!/usr/bin/env bash
# Writes generated/ from protos/, the only writer of generated/:
#   generated/python  messages, gRPC stubs and type stubs (grpcio-tools, mypy-protobuf),
#                     importable as `tally.v1`; shipped inside tally-genai-client
#   generated/go      messages and gRPC stubs, package tally/v1 (Debian's protoc-gen-go
#                     and protoc-gen-go-grpc)
#   generated/ts      protobuf-es messages and service descriptors, with google/rpc's error
#                     details (protoc-gen-es, pinned in scripts/protoc-gen-es)
# One protoc for all three: the one inside grpcio-tools. No network but npm's first install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# The mypy plugins are scripts next to the interpreter.
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
PROTOS=(protos/tally/v1/*.proto)
RELATIVE=("${PROTOS[@]#protos/}")

missing=""
for tool in protoc-gen-go protoc-gen-go-grpc node npm; do
  command -v "$tool" >/dev/null || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  echo "make generate needs:$missing (Debian: apt-get install protoc-gen-go protoc-gen-go-grpc nodejs npm)" >&2
  exit 1
fi

echo "generated/python"
rm -rf generated/python/tally
mkdir -p generated/python/tally/v1
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=generated/python --grpc_python_out=generated/python \
  --mypy_out=generated/python --mypy_grpc_out=generated/python \
  "${PROTOS[@]}"
# Regular packages, so that setuptools' find_packages picks them up.
: > generated/python/tally/__init__.py
: > generated/python/tally/v1/__init__.py
: > generated/python/tally/v1/py.typed

echo "generated/go"
rm -rf generated/go
mkdir -p generated/go
# No go_package in the contract: every file maps to the import path tally/v1 (GOPATH mode).
mappings=()
for proto in "${RELATIVE[@]}"; do
  mappings+=("--go_opt=M$proto=tally/v1" "--go-grpc_opt=M$proto=tally/v1")
done
"$PY" -m grpc_tools.protoc -I protos \
  --plugin=protoc-gen-go="$(command -v protoc-gen-go)" --plugin=protoc-gen-go-grpc="$(command -v protoc-gen-go-grpc)" \
  --go_out=generated/go --go-grpc_out=generated/go "${mappings[@]}" "${PROTOS[@]}"

echo "generated/ts"
GEN_ES=scripts/protoc-gen-es
if [ ! -x "$GEN_ES/node_modules/.bin/protoc-gen-es" ]; then
  (cd "$GEN_ES" && npm ci --no-audit --no-fund --silent)
fi
GOOGLEAPIS="$("$PY" -c 'import pathlib, google.rpc.error_details_pb2 as m; print(pathlib.Path(m.__file__).parents[2])')"
rm -rf generated/ts
mkdir -p generated/ts
"$PY" -m grpc_tools.protoc -I protos -I "$GOOGLEAPIS" \
  --plugin=protoc-gen-es="$GEN_ES/node_modules/.bin/protoc-gen-es" \
  --es_out=generated/ts --es_opt=target=ts,import_extension=js \
  "${PROTOS[@]}" google/rpc/error_details.proto
