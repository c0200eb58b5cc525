//! The VM's serial console to the task's stdout: containerd names a FIFO
//! (ctr, the CRI) or a `file://` log; `vmctl logs --follow` writes into
//! it until the VM ends.

use std::fs::{File, OpenOptions};

use crate::Error;

/// The task's stdout opened for writing, or None if the task has none.
/// A FIFO is opened read-write: that never waits for its reader, and a
/// reader that goes away (containerd restarting) gives no EPIPE.
pub fn open_stdout(stdout: &str) -> Result<Option<File>, Error> {
    if stdout.is_empty() {
        return Ok(None);
    }
    if let Some(rest) = stdout.strip_prefix("file://") {
        return OpenOptions::new()
            .create(true)
            .append(true)
            .open(rest)
            .map(Some)
            .map_err(|e| Error::Bundle(format!("the task's stdout {rest}: {e}")));
    }
    if stdout.contains("://") {
        return Err(Error::Bundle(format!(
            "the task's stdout {stdout:?}: only a FIFO or a file:// log is served (no binary:// loggers)"
        )));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(stdout)
        .map(Some)
        .map_err(|e| Error::Bundle(format!("the task's stdout {stdout}: {e}")))
}
