# The two commands of the README: `make demo` (set up, build, run the main job) and
# `make test` (set up, run every test). `.ci/run` calls `make test`.

.PHONY: setup demo test fuzz

setup:
	@scripts/setup.sh

demo: setup
	cargo build --release --bin zebra
	scripts/demo.sh

test: setup
	scripts/ptxas.sh
	cargo test --workspace

# A minute of coverage-guided fuzzing for each target: the frontend, the IR's text form,
# weights and .npy files (needs `cargo install cargo-fuzz`).
fuzz:
	scripts/fuzz.sh 60
