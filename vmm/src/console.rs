//! The console's threads: the one writing out what the guest wrote that
//! no exit did (the UART's coalesced bytes, the virtio console's lines),
//! and `--serial-input`'s feeding standard input to the UART.

use std::io::Write;

use crate::config::SerialOut;
use crate::device_manager::Machine;
use crate::devices::virtio_console::ConsolePort;

/// The console thread: writes out what the guest wrote that no exit did.
/// The UART's coalesced bytes have no doorbell, so they are looked for
/// every 10 ms while the guest writes, backing off to 500 ms when it does
/// not (any exit of the vCPU drains them sooner); the virtio console's
/// lines come out as it rings. An idle VM costs this thread 2 wakeups a
/// second.
pub fn serve_console(m: &Machine, port: Option<&ConsolePort>) -> ! {
    const FAST: std::time::Duration = std::time::Duration::from_millis(10);
    const SLOW: std::time::Duration = std::time::Duration::from_millis(500);
    let mut period = FAST;
    loop {
        let (changed, kick) = port.map_or((-1, None), |p| p.wait_fds());
        let mut fds = [changed, kick.unwrap_or(-1)].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: poll on two pollfds of this stack frame (a negative
        // descriptor is skipped). A doorbell closed meanwhile (a reset)
        // only ends this wait early: the next round asks again.
        let woken = unsafe { libc::poll(fds.as_mut_ptr(), 2, period.as_millis() as i32) } > 0;
        if let Some(p) = port {
            p.clear_doorbells();
        }
        let serial = m.coalesced.get().map_or(0, |c| c.drain(&m.pio, &m.mmio));
        let lines = port.map_or(0, |p| m.transmit_console(p));
        if serial + lines > 0 {
            m.flush_console();
            period = FAST;
        } else if !woken {
            period = (period * 2).min(SLOW);
        }
    }
}

/// `--serial-input`: standard input into the UART's receive FIFO as fast
/// as the guest reads it (what does not fit waits: looked at again after
/// 1 ms, backing off to 50 ms while the guest reads nothing), until
/// standard input ends.
pub fn feed_serial(m: &Machine) {
    use std::io::Read;
    let mut buf = [0u8; 256];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        let mut wait = std::time::Duration::from_millis(1);
        while !rest.is_empty() {
            let took = m
                .console
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .feed(rest);
            rest = &rest[took..];
            if took == 0 {
                std::thread::sleep(wait);
                wait = (wait * 2).min(std::time::Duration::from_millis(50));
            } else {
                wait = std::time::Duration::from_millis(1);
            }
        }
    }
}

/// Where the console goes (`--serial`).
pub fn serial_out(s: &SerialOut) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match s {
        SerialOut::Stdio => Box::new(std::io::stdout()),
        SerialOut::None => Box::new(std::io::sink()),
        SerialOut::File(p) => Box::new(std::fs::File::create(p)?),
    })
}
