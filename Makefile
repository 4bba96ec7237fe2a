# rsocket-rs: the README's two commands (`make demo`, `make test`) and `make install`.
#
#   make demo              set up (packages, VM), build, benchmark rsocket-rs against librdmacm,
#                          kernel TCP and raw verbs in the VM (bench/compare): table + SVG plot
#   make test              fmt, clippy, host tests, C tests, VM tests, quick benchmark (what CI runs)
#   make test-host-only    fmt, clippy and the tests that need no VM
#   make test-bench        bench/compare --quick --check: every implementation moves verified data
#   make test-preload      unmodified programs (redis, memcached, iperf3, nginx, ...) under the preload, VM
#   make test-stress       the randomized data-path stress (c-tests/stress.sh), fixed seeds, both devices
#   make install PREFIX=.. install lib (.so, .so.0, .a), rsocket.h, rsocket-rs.pc,
#                          librspreload-rs.so and bin/rsocket-run
#   make header            regenerate include/rsocket.h

PREFIX  ?= /usr/local
LIBDIR  ?= $(PREFIX)/lib
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
CARGO   ?= cargo
REL     := target/release
STAGE   := $(CURDIR)/build/stage
export PKG_CONFIG_PATH := $(STAGE)/lib/pkgconfig:$(PKG_CONFIG_PATH)

.PHONY: all build install header deps vm-setup stage demo test test-host test-host-only test-fuzz test-c test-vm test-preload test-stress test-bench clean

all: build

# Build dependencies on a fresh Debian 12 (idempotent, quick when present).
deps:
	@./scripts/install-deps

vm-setup: deps
	@vm/setup

# Builds need libclang (bindgen), the rdma-core headers and pkg-config: `deps` installs them, or
# stops with a one-line hint when it cannot.
# One cargo invocation for both libraries: one feature resolution, so nothing is built twice
# (two invocations resolved features apart and rebuilt rsocket-rs, the C API and rdma-sys).
build: deps
	$(CARGO) build --release -p rsocket-capi -p rsocket-preload

install: build
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(PREFIX)/bin
	install -m 755 $(REL)/librspreload_rs.so $(DESTDIR)$(LIBDIR)/librspreload-rs.so
	sed -e 's|@LIBDIR@|$(LIBDIR)|' preload/rsocket-run > $(DESTDIR)$(PREFIX)/bin/rsocket-run
	chmod 755 $(DESTDIR)$(PREFIX)/bin/rsocket-run
	install -m 755 $(REL)/librsocket_rs.so $(DESTDIR)$(LIBDIR)/librsocket-rs.so.0
	ln -sf librsocket-rs.so.0 $(DESTDIR)$(LIBDIR)/librsocket-rs.so
	install -m 644 $(REL)/librsocket_rs.a $(DESTDIR)$(LIBDIR)/librsocket-rs.a
	install -m 644 include/rsocket.h $(DESTDIR)$(PREFIX)/include/rsocket.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@VERSION@|$(VERSION)|' \
	    pkgconfig/rsocket-rs.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/rsocket-rs.pc

header:
	RSOCKET_BLESS=1 $(CARGO) test -p rsocket-capi --test header

stage:
	$(MAKE) --no-print-directory install PREFIX=$(STAGE)

# The README's main job: rsocket-rs, librdmacm's rsockets, kernel TCP and perftest side by side in
# one VM run (bench/README.md); prints the table and the path of the plot.
demo: vm-setup stage
	$(MAKE) --no-print-directory -C bench
	bench/compare

# Each step's time is printed ([timed] lines: scripts/timed).
TIMED := scripts/timed
test: deps vm-setup
	$(CARGO) fmt --all -- --check
	$(TIMED) $(CARGO) clippy --all-targets -- -D warnings
	$(TIMED) $(CARGO) clippy --workspace --all-targets -- -D warnings
	$(TIMED) $(MAKE) --no-print-directory test-host
	$(TIMED) $(MAKE) --no-print-directory test-fuzz
	$(TIMED) $(MAKE) --no-print-directory stage
	$(TIMED) $(MAKE) --no-print-directory test-c
	$(TIMED) $(MAKE) --no-print-directory test-vm
	$(TIMED) $(MAKE) --no-print-directory test-preload
	$(TIMED) $(MAKE) --no-print-directory test-stress
	$(TIMED) $(MAKE) --no-print-directory test-bench
	@echo "make test: all passed"

test-host:
	$(CARGO) test --workspace

# Coverage-guided fuzzing (libFuzzer, fuzz/): each target briefly on its committed corpus (the
# wire decoders, the protocol core under a hostile peer, the config files); a crash fails.
# Longer runs: fuzz/run SECONDS [TARGET ...].
test-fuzz:
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	$(CARGO) clippy --manifest-path fuzz/Cargo.toml -- -D warnings
	fuzz/run 15

# Everything that runs on the host alone, no VM: fmt, clippy, the core's and the service's unit
# tests, the header check, and the C suites' host checks (signatures, symbols, errnos, valgrind).
test-host-only: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace --lib --bins --benches
	$(CARGO) test -p rsocket-capi --tests
	$(CARGO) test -p rsocket-rs --test fork
	$(MAKE) --no-print-directory stage
	$(MAKE) --no-print-directory test-c

test-c:
	$(MAKE) --no-print-directory -C c-tests check

# RDMA tests. The Rust ones (tests/vm.rs) already ran under test-host: that test binary boots
# the VM itself, once on Soft-RoCE and once on Soft-iWARP. Here: the C and interop suite, on both,
# ending with the C programs' AddressSanitizer builds (LeakSanitizer at exit).
test-vm:
	$(TIMED) vm/run-in-vm -- c-tests/run-vm-tests.sh
	$(TIMED) vm/run-in-vm --siw -- c-tests/run-vm-tests.sh

# The preload (librspreload-rs.so via bin/rsocket-run) with unmodified Debian programs on rxe:
# redis, memcached, iperf3, sockperf, python asyncio, nginx + curl; data verified, the rxe
# counters show RDMA carried it; plain clients and servers on the other end (c-tests/preload.sh).
test-preload: stage
	vm/run-in-vm -- c-tests/preload.sh

# Randomized stress of the data path (c-tests/rsstress.c): fixed seeds, ours to ours, ours to
# librdmacm and librdmacm to ours, blocking two-thread and rpoll modes, plus the integrity
# issue's uneven stream; every byte checked. Longer runs with fresh seeds: scripts/stress-long.
test-stress: stage
	$(MAKE) --no-print-directory -C c-tests all
	$(TIMED) vm/run-in-vm -- c-tests/stress.sh --uneven
	$(TIMED) vm/run-in-vm --siw -- c-tests/stress.sh --uneven

# Quick benchmark run in the VM (~30 s): fails unless rsocket-rs, librdmacm and kernel TCP each moved
# byte-for-byte verified data at every size. No timing is asserted.
test-bench: stage
	$(MAKE) --no-print-directory -C bench
	bench/compare --quick --check

clean:
	$(CARGO) clean
	rm -rf build
	$(MAKE) -C c-tests clean
