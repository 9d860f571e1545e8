# hyper2kvm — common tasks.
#
#   make build       release build: target/release/hyper2kvm
#   make deps        install missing system tools (qemu-img, virt-xml-validate, …) and Rust components
#   make test        everything CI checks: deps, format, clippy, tests, the demo smoke run, system-test
#   make demo        build, start a demo daemon under ./demo/ and convert a sample VM (leaves it running)
#   make demo-stop   stop the demo daemon
#   make demo-check  demo then stop, non-interactive; fails if the demo failed
#   make bench       build, then time hyper2kvm convert against qemu-img (scripts/bench.sh)
#   make soak        the chaos test over many more jobs (SOAK_JOBS_PER_PRODUCER, SOAK_ROUNDS)
#   make system-test boot a Debian container with systemd + libvirtd, install the .deb, test it (root)
#   make deb         Debian package target/debian/hyper2kvm_*.deb (installs cargo-deb if missing)
#   make fuzz        run every fuzz target of fuzz/ for FUZZ_SECONDS (60) each (installs cargo-fuzz)
#   make fmt         format the code
#   make lint        format check and clippy
#   make clean       stop the demo, remove build output and ./demo/

CARGO ?= cargo

.DEFAULT_GOAL := build
.PHONY: build deps test demo demo-stop demo-check fmt lint clean deb system-test fuzz

build:
	$(CARGO) build --release

deps:
	scripts/install-deps.sh

# The steps run in this order on purpose: the cheap checks fail first, and the doctests run
# before the main test run so that its summary is the last test-runner output of the log.
# nextest (when installed) does not run doctests, hence the separate `cargo test --doc`.
test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --doc
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --all-targets; \
	else \
		$(CARGO) test --all-targets; \
	fi
	$(MAKE) demo-check
	scripts/k8s-validate.sh
	SYSTEST_OPTIONAL=1 scripts/system-test.sh
	CONTAINER_TEST_OPTIONAL=1 scripts/container-test.sh

demo:
	scripts/demo.sh

demo-stop:
	scripts/demo.sh stop

demo-check:
	scripts/demo.sh check

.PHONY: bench soak
bench: build
	scripts/bench.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	-scripts/demo.sh stop
	$(CARGO) clean
	rm -rf demo

# The chaos test over many more jobs (not in make test): SOAK_JOBS_PER_PRODUCER, SOAK_ROUNDS.
soak: deps
	$(CARGO) test --release --test chaos -- --ignored soak --nocapture

# Boots a Debian container with systemd and libvirtd, installs the .deb and runs an operator's
# path through it (scripts/system-test.sh). Needs root; `make test` runs it where it can.
system-test:
	scripts/system-test.sh

# The Debian package (metadata: [package.metadata.deb] in Cargo.toml; maintainer scripts in
# packaging/debian/). The units are checked first with systemd-analyze where it exists.
deb:
	$(CARGO) deb --version >/dev/null 2>&1 || $(CARGO) install cargo-deb --locked
	packaging/check-units.sh
	$(CARGO) deb

# libFuzzer targets beside the parsers of hostile input (fuzz/, its own workspace; not in make
# test). cargo fuzz passes nightly-only flags (-Zsanitizer=address …): RUSTC_BOOTSTRAP=1 lets the
# stable toolchain take them. New inputs go to fuzz/corpus/<target> (ignored by git), the
# committed seeds are fuzz/seeds/<target>; a crash stops that target's run and is saved under
# fuzz/artifacts/<target>/, the other targets still run, and make fails at the end.
# See docs/RELIABILITY.md ("Fuzzing").
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := manifest vmdk_descriptor vmdk_sparse ova ovf ova_mf config_envfile host_caps lock_record qemu_img_info

fuzz:
	$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	failed=; for target in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$target; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$target fuzz/corpus/$$target fuzz/seeds/$$target -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=512 -timeout=10 -print_final_stats=1 \
			|| failed="$$failed $$target"; \
	done; \
	if [ -n "$$failed" ]; then echo "make fuzz: failed:$$failed (crashes, hangs and OOMs are in fuzz/artifacts/)" >&2; exit 1; fi
