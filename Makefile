# The commands the README shows. `make demo` and `make test` install what is missing first.
.PHONY: setup build demo test test-quick test-vm bench lint clean install

CARGO ?= cargo

setup:
	./scripts/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

# The main job on an embedded default: local registry + scratch services.
demo: build
	./scripts/demo.sh

# Every test (what .ci/run runs): the workspace's tests, then the VM suite.
test: test-quick test-vm

# The workspace's tests without the VM suite (about 2 minutes once built).
test-quick: build
	$(CARGO) test --workspace --no-fail-fast

# The VM suite: builds the example OS, boots it under qemu; about 15 minutes.
test-vm: build
	./scripts/vm/setup.sh
	$(CARGO) test -p dnfimage-integration --test vm -- --ignored --nocapture

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Benchmarks, release binaries: fetch against skopeo, rebase/upgrade against ostree-ext,
# layering against dnf, and how fast the fetcher answers while a fetch runs.
bench: setup
	$(CARGO) build --release --workspace --bins
	./target/release/bench-fetch
	./target/release/bench-serve
	./target/release/bench-upgrade
	./target/release/bench-layer
	./target/release/bench-fleet

clean:
	$(CARGO) clean
	rm -rf .scratch

# Installs what is built (PROFILE=release|debug) into DESTDIR (default /) under PREFIX (/usr).
install:
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" SYSCONFDIR="$(SYSCONFDIR)" PROFILE="$(PROFILE)" ./scripts/install.sh
