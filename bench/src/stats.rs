//! The statistics the benchmarks report, each defined once (so that
//! "median" means one thing in every table of docs/benchmarks.md):
//!
//! - [`median`]: the middle sample of an odd count, the mean of the two
//!   middle samples of an even count;
//! - [`percentile`]: nearest rank: the smallest sample that at least `p`
//!   percent of the samples are at or below (`p` in 0..=100; 0 gives the
//!   minimum, 100 the maximum);
//! - [`spread`]: the median with the minimum and the maximum;
//! - [`median_run`]: which run is the middle one by a figure (of an even
//!   count the upper of the two middle ones), for a table that reports
//!   one whole run rather than the medians of figures from different runs.
//!
//! No samples is an error naming the statistic, never NaN, 0 or a panic.

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
#[error("no samples to take the {0} of")]
pub struct NoSamples(&'static str);

fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

/// The median of `samples` (see the module's documentation).
pub fn median(samples: &[f64]) -> Result<f64, NoSamples> {
    let s = sorted(samples);
    let mid = s.len() / 2;
    match s.len() {
        0 => Err(NoSamples("median")),
        n if n % 2 == 1 => Ok(s[mid]),
        _ => Ok((s[mid - 1] + s[mid]) / 2.0),
    }
}

/// The nearest-rank `p`th percentile of `samples`.
pub fn percentile(samples: &[f64], p: f64) -> Result<f64, NoSamples> {
    let s = sorted(samples);
    if s.is_empty() {
        return Err(NoSamples("percentile"));
    }
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * s.len() as f64).ceil() as usize;
    Ok(s[rank.clamp(1, s.len()) - 1])
}

/// A figure over runs: its median, lowest and highest.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn spread(samples: &[f64]) -> Result<Spread, NoSamples> {
    let s = sorted(samples);
    let (Some(&min), Some(&max)) = (s.first(), s.last()) else {
        return Err(NoSamples("spread"));
    };
    Ok(Spread {
        median: median(&s)?,
        min,
        max,
    })
}

/// The index in `samples` of the middle run (see the module's
/// documentation).
pub fn median_run(samples: &[f64]) -> Result<usize, NoSamples> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by(|&a, &b| samples[a].total_cmp(&samples[b]));
    order
        .get(samples.len() / 2)
        .copied()
        .ok_or(NoSamples("median run"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_definition_each_and_none_of_nothing() {
        assert_eq!(median(&[3.0, 1.0, 2.0]).unwrap(), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]).unwrap(), 2.5);
        assert!(median(&[]).is_err());
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0).unwrap(), 5.0);
        assert_eq!(percentile(&v, 90.0).unwrap(), 9.0);
        assert_eq!(percentile(&v, 99.0).unwrap(), 10.0);
        assert_eq!(percentile(&v, 0.0).unwrap(), 1.0);
        assert!(percentile(&[], 50.0).is_err());
        let s = spread(&[5.0, 1.0, 9.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (5.0, 1.0, 9.0));
        assert!(spread(&[]).is_err());
        assert_eq!(median_run(&[5.0, 1.0, 9.0]).unwrap(), 0);
        assert_eq!(median_run(&[4.0, 1.0, 3.0, 2.0]).unwrap(), 2);
        assert!(median_run(&[]).is_err());
    }
}
