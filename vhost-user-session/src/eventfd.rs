//! The frontend's eventfds, used so that no frontend can hold a worker.
//!
//! A call eventfd at its maximum count blocks a write to it until someone
//! reads it, which a hostile frontend never does; a kick eventfd in
//! semaphore mode gives up its count one at a time, so a worker that
//! waits on it level-triggered wakes for ever. So every eventfd a
//! frontend hands over is made nonblocking (a signal that finds the
//! counter full is one the guest has pending anyway: dropping it loses
//! nothing), and kicks are waited on edge-triggered (one wake-up per
//! kick the frontend writes, whatever the count).
//!
//! The descriptor's file description is the frontend's too: O_NONBLOCK
//! changes how its own reads behave. Frontends poll their eventfds (QEMU
//! makes every one nonblocking itself) or hand them to KVM, which does
//! not care.

use std::fs::File;
use std::io;

use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

/// Makes `f` nonblocking.
pub fn nonblocking(f: &File) -> io::Result<()> {
    let flags = fcntl_getfl(f)?;
    if !flags.contains(OFlags::NONBLOCK) {
        fcntl_setfl(f, flags | OFlags::NONBLOCK)?;
    }
    Ok(())
}
