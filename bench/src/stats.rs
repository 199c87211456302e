//! Statistics used in the report: median, min/max, ratios (traditional / zero-copy).

use serde::{Deserialize, Serialize};

/// Median of the finite values (mean of the two middle ones for an even count); `None` if none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Smallest finite value.
pub fn min(values: &[f64]) -> Option<f64> {
    values
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .min_by(f64::total_cmp)
}

/// Largest finite value.
pub fn max(values: &[f64]) -> Option<f64> {
    values
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .max_by(f64::total_cmp)
}

/// `numerator / denominator`, `None` when either is missing or the denominator is not > 0.
pub fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 && n.is_finite() && d.is_finite() => Some(n / d),
        _ => None,
    }
}

/// Median, min and max of a set of repetitions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// How many finite values.
    pub n: usize,
    /// Median.
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

impl Summary {
    /// Summarises the finite values; `None` if there are none.
    pub fn of(values: &[f64]) -> Option<Summary> {
        Some(Summary {
            n: values.iter().filter(|x| x.is_finite()).count(),
            median: median(values)?,
            min: min(values)?,
            max: max(values)?,
        })
    }
}

/// Throughput loss in percent: `100 * (1 - during / normal)` (the paper's Fig. 7 numbers).
pub fn degradation_percent(normal: f64, during: f64) -> Option<f64> {
    (normal > 0.0 && during.is_finite()).then(|| 100.0 * (1.0 - during / normal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(min(&[3.0, -1.0, 2.0]), Some(-1.0));
        assert_eq!(max(&[3.0, f64::INFINITY, 2.0]), Some(3.0));
        let s = Summary::of(&[700.0, 720.0, 713.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (3, 713.0, 700.0, 720.0));
        assert!(Summary::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn ratios() {
        assert_eq!(
            ratio(Some(20_100.0), Some(713.0)).map(|r| r.round()),
            Some(28.0)
        );
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(
            degradation_percent(100.0, 71.0).map(|d| d.round()),
            Some(29.0)
        );
        assert_eq!(degradation_percent(0.0, 1.0), None);
    }
}
