//! A helper thread that runs until its owner lets go of it: it is handed
//! one end of a socket pair, which turns readable (end of stream) once
//! the owner drops the other, to wait on beside whatever it waits for.

use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

pub struct Stoppable {
    stop: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl Stoppable {
    /// `work` runs on a thread named `name` with the stop end; dropping
    /// the returned value stops it and waits for it.
    pub fn spawn(
        name: &str,
        work: impl FnOnce(UnixStream) + Send + 'static,
    ) -> std::io::Result<Stoppable> {
        let (ours, theirs) = UnixStream::pair()?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || work(theirs))?;
        Ok(Stoppable {
            stop: Some(ours),
            thread: Some(thread),
        })
    }
}

impl Drop for Stoppable {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
