#!/usr/bin/env bash
# Builds the static guest agent, then runs image.rs's boot tests: build the lab guest image
# (reusing the cache when nothing changed), boot it under TCG with 64 MiB and with 1024 MiB
# filled, wait for VMBEAM-AGENT READY on the console, then PING / CHECK (PASS) / PHYS /
# STATS / CORRUPT / CHECK (FAIL) on the second serial port and GET /stats over HTTP.
# Prints boot-to-READY and fill times.
#
# Needs root (apt-get download, dpkg -x into the cache), the Debian mirror and
# qemu-system-x86_64. Cache: /var/cache/vmbeam-lab, or $VMBEAM_LAB_CACHE.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release -p vmbeam-guest-agent --target x86_64-unknown-linux-gnu
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
export VMBEAM_AGENT_BINARY=${VMBEAM_AGENT_BINARY:-$target_dir/x86_64-unknown-linux-gnu/release/vmbeam-guest-agent}
cargo test -p vmbeam-lab --features root-tests --lib image::tests::boot -- --nocapture --test-threads=1
