//! Helpers shared by the unit tests, notably the property tests' budget.

use proptest::test_runner::Config as ProptestConfig;

/// The number of cases each property runs: `VMBEAM_PROPTEST_CASES`, default 256. A longer
/// run: `VMBEAM_PROPTEST_CASES=100000 cargo test -p vmbeam-core prop_`.
pub(crate) fn proptest_config() -> ProptestConfig {
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
