# One entry point for everything: each target sets up what it needs (venv, generated code,
# Debian packages) so that `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_FILES := $(shell find protos -name '*.proto' | sort)
GO_APT := golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-3-dev golang-google-protobuf-dev protoc-gen-go-grpc protobuf-compiler

.PHONY: all venv protos test test-fast lint demo bench go-tools clean

all: protos

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	# xds-protos ships an old copy of opentelemetry/proto that overwrites opentelemetry-proto's
	# files (the OTLP exporter then fails to import): put opentelemetry-proto's own files back.
	$(PY) -m pip install -q --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	echo "$(CURDIR)/gen" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pymesh-gen.pth"
	touch $@

# Python code generated from protos/ with grpcio-tools (never edited by hand, not committed).
protos: gen/.stamp
gen/.stamp: $(STAMP) $(PROTO_FILES)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTO_FILES)
	touch $@

# Go programs: the independent gRPC implementation used by the conformance suite, and the
# benchmark's upstream and load generator. Built offline from Debian's grpc-go.
go-tools:
	./scripts/ensure-apt.sh $(GO_APT)
	$(MAKE) -C bench/go

test: protos go-tools
	./scripts/ensure-apt.sh nginx
	$(PY) -m pytest -q

test-fast: protos
	$(PY) -m pytest -q tests/unit

lint: protos
	$(VENV)/bin/ruff check sidecar control_plane demo_services tests bench
	$(VENV)/bin/mypy

demo: protos
	$(PY) -m demo_services.run

bench: protos go-tools
	./scripts/ensure-apt.sh nginx nghttp2-client
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) gen bench/results bench/go/bin
