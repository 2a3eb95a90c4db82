# The two commands of the README. Everything else is a building block of these.
.PHONY: demo test prereqs lint fuzz bench

demo:
	samples/local/demo.sh

# All tests, on a fresh machine: installs its own prerequisites (idempotently) first.
test: prereqs lint
	cargo build --workspace --all-targets
	cargo test --workspace --no-fail-fast
	$(MAKE) fuzz

prereqs:
	scripts/install-prereqs.sh

# The SNI parser's fuzz target, bounded (FUZZ_SECONDS, default 60); installs cargo-fuzz if missing.
fuzz:
	scripts/fuzz.sh

lint:
	cargo fmt --all -- --check
	scripts/module-cycles.py
	cargo clippy --workspace --all-targets -- -D warnings

# Benchmarks (not tests): figures against baselines measured in the same run.
# `make bench BENCH=hgate` runs one (the file names in tests/benches).
bench: prereqs
	cargo build --profile perf -p krun -p hgate -p krun-tests --bins
	cargo bench --profile perf -p krun-tests $(if $(BENCH),--bench $(BENCH))
