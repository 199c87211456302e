#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, the Nova shim's tests against the real
# nova package, and the end-to-end tests on the real lab (libvirtd, QEMU, dbus-daemon,
# vmbeamd, the guest agent, Nova's live-migration loop, `vmbeam bench --quick`). Needs root
# on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all --check
cargo fmt --manifest-path packaging/gen/Cargo.toml --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
PROFILE=debug scripts/build.sh
# The Nova shim: its venv (nova from PyPI, cached), ruff and unit tests; the venv is also what
# tests/tests/nova_shim.rs runs Nova's live-migration loop with on the lab.
scripts/test-nova.sh
# The end-to-end tests share one host-wide lab: one test at a time.
cargo test --workspace -- --test-threads=1
