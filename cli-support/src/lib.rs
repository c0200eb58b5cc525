//! The conventions `img`, `vmm` and `blk-backend` share at their edges:
//! sizes are read the same way everywhere (qemu-img's: `1.5G`, `512k`,
//! `4096`), an error is reported as one line in which each cause
//! appears once, log lines a peer can cause are bounded (`log_limit`), and
//! a path another process is about to make is waited for without polling
//! (`path_wait`).

pub mod exit_signals;
pub mod log_limit;
pub mod path_wait;
pub mod progress;

/// A size the user wrote that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error(
        "{0:?} is not a size: a number with an optional suffix k, M, G, T, P or E (binary units)"
    )]
    NotANumber(String),
    #[error("{0:?}: unknown size suffix {1:?} (k, M, G, T, P or E)")]
    BadSuffix(String, char),
    #[error("{0:?} is too large a size")]
    TooLarge(String),
    #[error("{0:?} is not a whole number of bytes")]
    Fraction(String),
}

/// Parses a size as qemu-img does: bytes, or a number (fractions allowed)
/// with a binary suffix `k`/`K`, `M`, `G`, `T`, `P`, `E` (`b`/`B` for
/// bytes). `1.5G` is 1610612736.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let not_a_number = || SizeError::NotANumber(text.to_string());
    let numeric = |d: &str| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit() || c == '.');
    let (digits, shift) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            if !numeric(&t[..t.len() - 1]) {
                return Err(not_a_number());
            }
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(SizeError::BadSuffix(text.to_string(), c)),
            };
            (&t[..t.len() - 1], shift)
        }
        _ => (t, 0),
    };
    if !numeric(digits) {
        return Err(not_a_number());
    }
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(not_a_number());
    }
    let too_large = || SizeError::TooLarge(text.to_string());
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let mut bytes = whole.checked_mul(1u64 << shift).ok_or_else(too_large)?;
    if !frac.is_empty() {
        // Exact decimal arithmetic: frac / 10^len * 2^shift must be whole.
        let len = frac.len().min(18) as u32;
        let f: u128 = frac[..len as usize].parse().map_err(|_| not_a_number())?;
        let scaled = f << shift;
        let div = 10u128.pow(len);
        if !scaled.is_multiple_of(div) || frac.len() > 18 && frac[18..].chars().any(|c| c != '0') {
            return Err(SizeError::Fraction(text.to_string()));
        }
        let extra = u64::try_from(scaled / div).map_err(|_| too_large())?;
        bytes = bytes.checked_add(extra).ok_or_else(too_large)?;
    }
    Ok(bytes)
}

/// Logs to stderr through `tracing`, filtered by RUST_LOG (`default`
/// without it). A log that cannot be written (a full disk) loses the line
/// and nothing else: tracing-subscriber's own report of the failure would
/// be an `eprintln!` to that same stderr, which panics.
pub fn init_logging(default: &str) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // virtio-queue logs what a guest's rings hold (an impossible index, a
    // ring out of memory) once per look, outside any limit; our own code
    // checks each of those first and reports it within a session's or a
    // device's limit. Asked for by name in RUST_LOG, it is logged.
    let named = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("virtio_queue"));
    if let (false, Ok(off)) = (named, "virtio_queue=off".parse()) {
        filter = filter.add_directive(off);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_env_filter(filter)
        .init();
}

/// `eprintln!` that cannot fail: a line to stderr, dropped when stderr
/// will not take it (a log file on a full disk, a closed pipe).
/// `eprintln!` panics there, and a daemon whose log is full must keep
/// serving (a panic under a seccomp filter can even end the process with
/// SIGSYS on the way out).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that cannot fail (see [`say!`]).
#[macro_export]
macro_rules! say_out {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout(), $($arg)*);
    }};
}

/// An error and its causes as one line, each cause once: a cause whose
/// text the line already holds (a library that names its source in its
/// own message) is not repeated.
pub fn report(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_qemu_img_reads_them() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("100b"), Ok(100));
        assert_eq!(parse_size(" 2g "), Ok(2 << 30));
        assert!(matches!(parse_size("lots"), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size(""), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size("-1G"), Err(SizeError::NotANumber(_))));
        assert!(matches!(
            parse_size("1.2.3M"),
            Err(SizeError::NotANumber(_))
        ));
        assert!(matches!(
            parse_size("5X"),
            Err(SizeError::BadSuffix(_, 'X'))
        ));
        assert!(matches!(
            parse_size("99999999999G"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(matches!(parse_size("0.3"), Err(SizeError::Fraction(_))));
        assert!(parse_size("lots")
            .unwrap_err()
            .to_string()
            .contains("\"lots\" is not a size"));
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        #[derive(Debug, thiserror::Error)]
        #[error("x.img: {source}")]
        struct Named {
            #[source]
            source: std::io::Error,
        }
        let e = anyhow::Error::new(Named { source: io }).context("opening x.img");
        assert_eq!(
            report(&e),
            "opening x.img: x.img: No such file or directory"
        );
    }
}
