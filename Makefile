# Two commands for a new user: `make run` and `make test`. Both install what
# they need first (scripts/setup.sh). One cargo profile (dev, tuned in
# Cargo.toml) serves tests, run and benchmarks, and the target directory lives
# outside the clone so RocksDB's C++ is compiled once per machine.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/tardigrade/target
CARGO ?= cargo
# Build scripts of some test dependencies (etcd-client) need a protoc: use
# the one vendored by the protoc-bin-vendored crate, never a system one.
ifeq ($(PROTOC),)
PROTOC := $(shell scripts/protoc-path.sh)
endif
export PROTOC
# Where `make run` keeps its single node's data, and where it listens.
STORE ?= $(CURDIR)/data/single-node
LISTEN ?= 127.0.0.1:2379
HTTP ?= 127.0.0.1:8080

.PHONY: run test build image setup bench bench-storage bench-raft bench-vs-etcd clean-target

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace

run: build
	@echo "Starting a single node (data in $(STORE); STORE=..., LISTEN=..., HTTP=... to change)."
	"$(CARGO_TARGET_DIR)/debug/tardigrade" start-single-node --store "$(STORE)" --listen-addr $(LISTEN) --http-addr $(HTTP)

test:
	@scripts/test.sh

# The container image tardigrade:dev, from our own binary (nothing pulled).
image: build
	scripts/image.sh

bench: bench-storage bench-raft

bench-storage: setup
	$(CARGO) bench --profile dev -p tardigrade-storage --bench storage

# Tardigrade against etcd, same machine, same requests (minutes; not part of make test).
bench-vs-etcd: build
	scripts/bench-vs-etcd.sh $(SECS) $(RUNS)

clean-target:
	rm -rf "$(CARGO_TARGET_DIR)"

bench-raft:
	$(CARGO) bench --profile dev -p tardigrade-raft --bench raft
