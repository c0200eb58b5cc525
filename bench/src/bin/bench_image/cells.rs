//! How the figures are written in the tables.

use bench::stats::Spread;
use bench::table::NO_RATIO;

use crate::{GIB, KIB, MIB, TIB};

/// A size in the largest binary unit it reaches ("1 GiB", "1.50 MiB").
pub fn fmt_bytes(b: u64) -> String {
    let units = [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];
    for (name, unit) in units {
        if b >= unit {
            let v = b as f64 / unit as f64;
            return if v.fract() == 0.0 {
                format!("{v:.0} {name}")
            } else {
                format!("{v:.2} {name}")
            };
        }
    }
    format!("{b} B")
}

/// A median with its spread: "median (min–max)".
pub fn fmt_spread(s: &Spread, decimals: usize) -> String {
    format!(
        "{:.d$} ({:.d$}–{:.d$})",
        s.median,
        s.min,
        s.max,
        d = decimals
    )
}

/// A goal's verdict.
pub fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

/// A spread of per-run ratios, or [`NO_RATIO`] when a run had none.
pub fn fmt_ratio_spread(s: Option<&Spread>, decimals: usize) -> String {
    s.map_or_else(|| NO_RATIO.to_string(), |s| fmt_spread(s, decimals))
}
