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

/// `bytes` with one byte changed (XOR with a non-zero `b`), cut short at `pos`, extended by
/// `b`, or with `b` inserted at `pos`, as `mode` picks.
pub(crate) fn mutate(mut bytes: Vec<u8>, mode: u8, pos: proptest::sample::Index, b: u8) -> Vec<u8> {
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
pub(crate) fn mutate_text(text: &str, mode: u8, pos: proptest::sample::Index, b: u8) -> String {
    String::from_utf8_lossy(&mutate(text.as_bytes().to_vec(), mode, pos, b)).into_owned()
}
