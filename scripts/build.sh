#!/usr/bin/env bash
# Builds VMBeam (PROFILE=release, the default, or debug) and the statically linked guest
# agent the lab puts in its guests (always release: it fills and verifies guest memory).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
flag=(); [ "$PROFILE" = release ] && flag=(--release)
cargo build "${flag[@]}" --workspace --bins --quiet
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release -p vmbeam-guest-agent --target x86_64-unknown-linux-gnu --quiet
