//! A queue worker's thread and its stop: the worker waits on the stop
//! eventfd with everything else it waits on (and nothing it waits on
//! blocks), so [`WorkerHandle::stop`] always returns.

use std::io;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub struct WorkerHandle {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl WorkerHandle {
    /// The eventfd a worker about to start waits on for its stop.
    pub fn stop_event() -> io::Result<EventFd> {
        EventFd::new(EFD_NONBLOCK)
    }

    /// Runs `run` on a thread named `name`; `stop` (from
    /// [`WorkerHandle::stop_event`]) is written to stop it, and stays
    /// open until the thread is joined.
    pub fn spawn(
        name: String,
        stop: EventFd,
        run: impl FnOnce() + Send + 'static,
    ) -> io::Result<WorkerHandle> {
        let thread = std::thread::Builder::new().name(name).spawn(run)?;
        Ok(WorkerHandle { stop, thread })
    }

    /// Stops the worker and waits for its thread.
    pub fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
    }
}
