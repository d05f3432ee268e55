# Two commands for a new user: `make run` and `make test`. Both install what
# they need first (scripts/setup.sh). One cargo profile (dev, tuned in
# Cargo.toml) serves tests, run and benchmarks, and the target directory lives
# outside the clone so RocksDB's C++ is compiled once per machine.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/tardigrade/target
CARGO ?= cargo

.PHONY: run test build setup bench bench-storage clean-target

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace

run: build
	@echo
	@echo "Tardigrade, as of now: the storage engine (crates/storage) and its protobuf types (crates/proto)."
	@echo "There is no node to start yet; the next issues add the raft core and a single node serving etcd's API."
	@echo "  make test            run every test (storage model tests, crash tests)"
	@echo "  make bench-storage   measure the storage engine on this disk"

test:
	@scripts/test.sh

bench: bench-storage

bench-storage: setup
	$(CARGO) bench --profile dev -p tardigrade-storage --bench storage

clean-target:
	rm -rf "$(CARGO_TARGET_DIR)"
