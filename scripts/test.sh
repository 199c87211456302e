#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the end-to-end tests on the real
# lab (libvirtd, QEMU, dbus-daemon, vmbeamd, the guest agent). Needs root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all --check
cargo fmt --manifest-path packaging/gen/Cargo.toml --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
PROFILE=debug scripts/build.sh
# The end-to-end tests share one host-wide lab: one test at a time.
cargo test --workspace -- --test-threads=1
