//! The property tests' shared helpers: their budget (`VMBEAM_PROPTEST_CASES`), a runner that
//! prints how many cases it tried, and byte/text mutators. vmbeam-core's own tests use them,
//! and other crates' tests through the `proptest-support` feature.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

/// The number of cases each property runs: `VMBEAM_PROPTEST_CASES`, default 256. A longer
/// run: `VMBEAM_PROPTEST_CASES=100000 cargo test -p vmbeam-core prop_` (and `-p vmbeam-bus`,
/// `-p vmbeam-qemu`).
pub fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("VMBEAM_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs the property `test` over `strategy` with [`proptest_config`]'s budget, then prints
/// how many cases it tried, e.g. `prop_x: 256 cases tried, passed`. The line goes to the
/// process's stderr itself, not through the test harness's capture, so that every run
/// shows it. A failure panics with proptest's minimal failing case.
pub fn check<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let config = proptest_config();
    let budget = config.cases;
    let mut runner = TestRunner::new(config);
    let tried = AtomicU64::new(0);
    let result = runner.run(&strategy, |v| {
        tried.fetch_add(1, Ordering::Relaxed);
        test(v)
    });
    let tried = tried.load(Ordering::Relaxed);
    let outcome = if result.is_ok() { "passed" } else { "FAILED" };
    let _ = writeln!(
        std::io::stderr(),
        "{name}: {tried} cases tried, {outcome} (budget {budget}: VMBEAM_PROPTEST_CASES)"
    );
    if let Err(e) = result {
        panic!("{name}: {e}\n{runner}");
    }
}

/// `bytes` with one byte changed (XOR with a non-zero `b`), cut short at `pos`, extended by
/// `b`, or with `b` inserted at `pos`, as `mode` picks.
pub fn mutate(mut bytes: Vec<u8>, mode: u8, pos: proptest::sample::Index, b: u8) -> Vec<u8> {
    if bytes.is_empty() {
        bytes.push(b);
        return bytes;
    }
    let i = pos.index(bytes.len());
    match mode % 4 {
        0 => bytes[i] ^= b.max(1),
        1 => bytes.truncate(i),
        2 => bytes.push(b),
        _ => bytes.insert(i, b),
    }
    bytes
}

/// [`mutate`] for text: the result is made valid UTF-8 (lossily).
pub fn mutate_text(text: &str, mode: u8, pos: proptest::sample::Index, b: u8) -> String {
    String::from_utf8_lossy(&mutate(text.as_bytes().to_vec(), mode, pos, b)).into_owned()
}
