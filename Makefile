# The two commands of the README. Everything else is a building block of these.
.PHONY: demo test prereqs lint bench

demo:
	samples/local/demo.sh

# All tests, on a fresh machine: installs its own prerequisites (idempotently) first.
test: prereqs lint
	cargo build --workspace --all-targets
	cargo test --workspace --no-fail-fast

prereqs:
	scripts/install-prereqs.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# Benchmarks (not tests): figures against baselines measured in the same run.
bench: prereqs
	cargo build --release -p krun -p krun-tests
	cargo bench -p krun-tests --bench startup
	cargo bench -p krun-tests --bench identity
	cargo bench -p krun-tests --bench discovery
	cargo build --release -p hgate
	cargo bench -p krun-tests --bench hgate
