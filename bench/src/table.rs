//! The benchmarks' markdown tables, and the one ratio they print.
//!
//! A [`Table`] is a header of named columns, each lined up left (text) or
//! right (figures), and rows of cells already formatted: every benchmark
//! keeps its own number formats, the table only lays them out.
//!
//! A [`Ratio`] is a figure over a baseline measured in the same run
//! (this over host fio, ours over QEMU's, one size over the other). It is
//! the only division by a baseline in the tables, with one rule: a
//! baseline that is missing, zero or not finite, or a figure that is
//! missing or not finite, gives no ratio, printed [`NO_RATIO`] ("n/a"):
//! never inf or NaN, and never a figure over an invented floor. A row
//! that has no ratio by design (the baseline's own row) has an empty cell
//! instead.

use std::fmt;

/// The cell of a ratio there is none of (see the module's documentation).
pub const NO_RATIO: &str = "n/a";

/// How a column's cells line up: text left, figures right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A markdown table: named columns, then rows of formatted cells; shown
/// (`Display`) as markdown, one line per row, ending in a newline.
#[derive(Debug, Clone)]
pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table of these columns (name and alignment), and no rows yet.
    pub fn new<S: Into<String>>(columns: impl IntoIterator<Item = (S, Align)>) -> Table {
        Table {
            columns: columns.into_iter().map(|(n, a)| (n.into(), a)).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row: one cell per column, in the columns' order (a missing
    /// cell shows empty, one too many not at all).
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Table {
        let row: Vec<String> = cells.into_iter().map(Into::into).collect();
        debug_assert_eq!(row.len(), self.columns.len(), "cells of a row: {row:?}");
        self.rows.push(row);
        self
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_line(f, self.columns.iter().map(|(n, _)| n.as_str()))?;
        for (_, align) in &self.columns {
            f.write_str(match align {
                Align::Left => "|---",
                Align::Right => "|---:",
            })?;
        }
        writeln!(f, "|")?;
        for row in &self.rows {
            write_line(
                f,
                (0..self.columns.len()).map(|i| row.get(i).map_or("", String::as_str)),
            )?;
        }
        Ok(())
    }
}

/// One line of a table: `| a | b |`.
fn write_line<'a>(f: &mut fmt::Formatter<'_>, cells: impl Iterator<Item = &'a str>) -> fmt::Result {
    for c in cells {
        write!(f, "| {c} ")?;
    }
    writeln!(f, "|")
}

/// A figure over a baseline measured in the same run, or none (see the
/// module's documentation); in JSON the number, or null.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct Ratio(Option<f64>);

impl Ratio {
    /// `value / baseline`, either of which may be missing.
    pub fn of(value: impl Into<Option<f64>>, baseline: impl Into<Option<f64>>) -> Ratio {
        let usable = |x: Option<f64>| x.filter(|x| x.is_finite());
        let baseline = usable(baseline.into()).filter(|b| *b != 0.0);
        Ratio(
            usable(value.into())
                .zip(baseline)
                .and_then(|(v, b)| usable(Some(v / b))),
        )
    }

    /// Each run's figure over the same run's baseline, the runs paired in
    /// order; none when any run has no ratio.
    pub fn per_run(values: &[f64], baselines: &[f64]) -> Option<Vec<f64>> {
        values
            .iter()
            .zip(baselines)
            .map(|(&v, &b)| Ratio::of(v, b).get())
            .collect()
    }

    /// The ratio cell of row `k` of a pair measured against each other,
    /// ours then the baseline's: ours over the baseline's `figure`, as
    /// "times", on our row; empty on the baseline's own row.
    pub fn pair_cell<T>(
        pair: &[T],
        k: usize,
        figure: impl Fn(&T) -> f64,
        decimals: usize,
    ) -> String {
        if k != 0 {
            return String::new();
        }
        Ratio::of(pair.first().map(&figure), pair.get(1).map(&figure)).times(decimals)
    }

    /// The ratio, if there is one.
    pub fn get(self) -> Option<f64> {
        self.0
    }

    /// The ratio with `decimals` places ("0.97"), or [`NO_RATIO`].
    pub fn cell(self, decimals: usize) -> String {
        self.0
            .map_or_else(|| NO_RATIO.to_string(), |r| format!("{r:.decimals$}"))
    }

    /// The same as "times" ("1.25x"), as the tables against another
    /// tool print it.
    pub fn times(self, decimals: usize) -> String {
        self.0
            .map_or_else(|| NO_RATIO.to_string(), |r| format!("{r:.decimals$}x"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_as_markdown() {
        let mut t = Table::new([
            ("job", Align::Left),
            ("MB/s", Align::Right),
            ("", Align::Right),
        ]);
        t.row(["seq read", "12.5", "1.10x"])
            .row(["seq write", "3.0", ""]);
        assert_eq!(
            t.to_string(),
            "| job | MB/s |  |\n|---|---:|---:|\n| seq read | 12.5 | 1.10x |\n| seq write | 3.0 |  |\n"
        );
    }

    #[test]
    fn no_ratio_without_a_usable_baseline() {
        assert_eq!(Ratio::of(3.0, 2.0).get(), Some(1.5));
        assert_eq!(Ratio::of(3.0, 2.0).times(2), "1.50x");
        assert_eq!(Ratio::of(1.0, 3.0).cell(3), "0.333");
        for baseline in [
            Some(0.0),
            Some(-0.0),
            None,
            Some(f64::NAN),
            Some(f64::INFINITY),
        ] {
            assert_eq!(Ratio::of(3.0, baseline).get(), None, "{baseline:?}");
            assert_eq!(Ratio::of(3.0, baseline).cell(2), NO_RATIO);
        }
        assert_eq!(Ratio::of(f64::NAN, 2.0).times(2), NO_RATIO);
        assert_eq!(Ratio::of(None, 2.0).get(), None);
        // A quotient too large to be finite is none either.
        assert_eq!(Ratio::of(f64::MAX, 0.5).get(), None);
        assert_eq!(Ratio::of(0.0, 2.0).get(), Some(0.0));
        assert_eq!(
            Ratio::per_run(&[2.0, 3.0], &[1.0, 2.0]),
            Some(vec![2.0, 1.5])
        );
        assert_eq!(Ratio::per_run(&[2.0, 3.0], &[1.0, 0.0]), None);
        let pair = [4.0, 2.0];
        assert_eq!(Ratio::pair_cell(&pair, 0, |x| *x, 2), "2.00x");
        assert_eq!(Ratio::pair_cell(&pair, 1, |x| *x, 2), "");
        assert_eq!(Ratio::pair_cell(&pair[..1], 0, |x| *x, 2), NO_RATIO);
    }
}
