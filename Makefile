# Two commands for a new user: `make run` and `make test`. Both install what
# they need first (scripts/setup.sh). One cargo profile (dev, tuned in
# Cargo.toml) serves tests, run and benchmarks, and the target directory lives
# outside the clone so RocksDB's C++ is compiled once per machine.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/tardigrade/target
CARGO ?= cargo

.PHONY: run test build setup bench bench-storage bench-raft clean-target

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace

run: build
	@echo
	@echo "Tardigrade, as of now: the storage engine (crates/storage), the Raft core with its"
	@echo "simulator (crates/raft) and the protobuf types (crates/proto). There is no node to start"
	@echo "yet: the next issue adds a single node serving etcd's API, which 'make run' will start."
	@echo "  make test            run every test (storage model and crash tests, raft simulator)"
	@echo "  make bench-storage   measure the storage engine on this disk"
	@echo "  make bench-raft      measure the Raft core alone"

test:
	@scripts/test.sh

bench: bench-storage bench-raft

bench-storage: setup
	$(CARGO) bench --profile dev -p tardigrade-storage --bench storage

clean-target:
	rm -rf "$(CARGO_TARGET_DIR)"

bench-raft:
	$(CARGO) bench --profile dev -p tardigrade-raft --bench raft
