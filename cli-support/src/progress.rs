//! Progress of a long operation on stderr: a bar on a terminal, percent
//! lines when asked for (qemu-img's -p) and not on one.

use std::io::IsTerminal;

/// Progress on stderr: a bar on a terminal, percent lines with -p otherwise.
pub struct ProgressReport {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
    last_percent: u64,
}

impl ProgressReport {
    pub fn new(verb: &str, asked: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b.set_message(verb.to_string());
            b
        });
        ProgressReport {
            bar,
            lines: asked && !tty,
            last_percent: u64::MAX,
        }
    }
    pub fn update(&mut self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
        } else if self.lines && total > 0 {
            let p = done.min(total) * 100 / total;
            if p / 10 != self.last_percent / 10 || self.last_percent == u64::MAX {
                crate::say!("    ({p}.00/100%)");
                self.last_percent = p;
            }
        }
    }
    pub fn done(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
