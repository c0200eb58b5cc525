//! `vmctl console NAME`: the VM's serial console, input included, as
//! `virsh console` gives it. The supervisor starts the vmm with
//! `--serial-input` (its stdin feeds the UART's receive FIFO) and serves
//! `console.sock` in the VM's directory: one client at a time, whose bytes
//! go to the vmm's stdin and who gets the console's output as it comes
//! (besides console.log, which keeps it all). The client puts a terminal
//! in raw mode and detaches on Ctrl-].

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};

use crate::process::wait_any;
use crate::state::{Observed, Root, VmDir};

/// The byte that detaches a client (Ctrl-], as telnet and virsh use).
pub const DETACH: u8 = 0x1d;

/// The attached client's end, where the console's output is copied.
pub type Attached = Arc<Mutex<Option<UnixStream>>>;

/// Copies `bytes` to the attached client, if any: without blocking (a
/// client that does not keep up loses output, never the guest its
/// console); a client that went is forgotten.
pub fn tee(attached: &Attached, bytes: &[u8]) {
    let mut a = attached.lock().unwrap_or_else(|e| e.into_inner());
    let gone = match a.as_mut().map(|c| c.write(bytes)) {
        Some(Err(e)) => e.kind() != std::io::ErrorKind::WouldBlock,
        _ => false,
    };
    if gone {
        *a = None;
    }
}

/// The supervisor's side, for one run: `console.sock` served until
/// dropped (then removed).
pub struct Relay {
    socket: PathBuf,
    _serving: crate::stoppable::Stoppable,
}

impl Relay {
    pub fn serve(
        vm: &VmDir,
        vmm_stdin: std::process::ChildStdin,
        attached: Attached,
    ) -> Result<Relay> {
        let socket = vm.console_socket();
        let _ = std::fs::remove_file(&socket);
        let listener =
            UnixListener::bind(&socket).with_context(|| format!("{}", socket.display()))?;
        let serving = crate::stoppable::Stoppable::spawn("console", move |stop| {
            accept_loop(&listener, &stop, vmm_stdin, &attached)
        })?;
        Ok(Relay {
            socket,
            _serving: serving,
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One client at a time: its input into the vmm's stdin until it goes
/// (or `stop`); another one meanwhile is told and turned away.
fn accept_loop(
    listener: &UnixListener,
    stop: &UnixStream,
    mut vmm_stdin: std::process::ChildStdin,
    attached: &Attached,
) {
    let mut client: Option<UnixStream> = None;
    let mut buf = [0u8; 4096];
    loop {
        let mut fds: Vec<&dyn AsFd> = vec![stop, listener];
        if let Some(c) = &client {
            fds.push(c);
        }
        let woke = wait_any(&fds, None);
        if woke[0] {
            return;
        }
        if woke[1] {
            if let Ok((mut c, _)) = listener.accept() {
                if client.is_some() {
                    let _ = c.write_all(b"vmctl: the console is attached elsewhere\n");
                } else if let Ok(out) = c.try_clone() {
                    let _ = out.set_nonblocking(true);
                    *attached.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
                    client = Some(c);
                }
            }
        }
        if woke.get(2).copied().unwrap_or(false) {
            let n = client.as_mut().map_or(0, |c| c.read(&mut buf).unwrap_or(0));
            if n == 0 || vmm_stdin.write_all(&buf[..n]).is_err() {
                // The client went (or the vmm's input did).
                client = None;
                *attached.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
    }
}

/// A terminal put in raw mode for the length of an attach (restored when
/// dropped); nothing on a stdin that is no terminal.
struct RawTerminal(Option<rustix::termios::Termios>);

impl RawTerminal {
    fn new() -> RawTerminal {
        let stdin = std::io::stdin();
        let Ok(saved) = rustix::termios::tcgetattr(&stdin) else {
            return RawTerminal(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                t,
            );
        }
    }
}

/// `vmctl console NAME`: attached until Ctrl-] (exit 0, the VM runs on)
/// or the VM ends.
pub fn attach(root: &Root, name: &str) -> Result<()> {
    let vm = root.vm(name)?;
    if !matches!(vm.observed()?, Observed::Running) {
        bail!("VM {name} is not running: it has no console to attach to");
    }
    let mut sock = UnixStream::connect(vm.console_socket()).with_context(|| {
        format!("VM {name}: its console (started before vmctl had consoles? restart it)")
    })?;
    cli_support::say!("vmctl: attached to {name}'s console (Ctrl-] detaches)");
    let raw = Arc::new(Mutex::new(Some(RawTerminal::new())));
    let mut from_vm = sock.try_clone()?;
    let restore = Arc::clone(&raw);
    let shown = name.to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        loop {
            match from_vm.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                        break;
                    }
                }
            }
        }
        drop(restore.lock().unwrap_or_else(|e| e.into_inner()).take());
        cli_support::say!("\r\nvmctl: {shown}'s console closed");
        std::process::exit(0);
    });
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = stdin.read(&mut buf).unwrap_or(0);
        if n == 0 {
            // Input ended (a pipe): the output goes on until the VM ends.
            let _ = sock.shutdown(std::net::Shutdown::Write);
            loop {
                std::thread::park();
            }
        }
        let (send, detach) = match buf[..n].iter().position(|&b| b == DETACH) {
            Some(k) => (&buf[..k], true),
            None => (&buf[..n], false),
        };
        sock.write_all(send).context("the console went")?;
        if detach {
            drop(raw.lock().unwrap_or_else(|e| e.into_inner()).take());
            cli_support::say!("\r\nvmctl: detached from {name}'s console (it runs on)");
            return Ok(());
        }
    }
}
