//! How a VM ends: what the devices, the vCPUs and the control API report
//! to the thread that waits for the VM (below `vm`, so that devices name
//! it without depending on the machine that holds them).

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote this value to the debug-exit port.
    GuestExit(u8),
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reboot (reported; the VM ends).
    Reboot,
    /// A triple fault, an emulation failure or an internal error: what
    /// happened and the vCPU's registers.
    Fault(String),
    /// The control API asked the VM to end (forced: without stopping the
    /// disks' queues first).
    Shutdown { force: bool },
}

impl VmEvent {
    /// The vmm's exit status for this end: the value a test guest wrote to
    /// the debug-exit port, 0 for a power-off or a shutdown, 1 for a fault.
    pub fn exit_status(&self) -> i32 {
        match self {
            VmEvent::GuestExit(code) => *code as i32,
            VmEvent::PowerOff | VmEvent::Shutdown { .. } | VmEvent::Reboot => 0,
            VmEvent::Fault(_) => 1,
        }
    }

    /// How the VM ended, in a few words.
    pub fn describe(&self) -> String {
        match self {
            VmEvent::GuestExit(code) => format!("the guest exited with {code}"),
            VmEvent::PowerOff => "the guest powered off".into(),
            VmEvent::Reboot => "the guest asked for a reboot".into(),
            VmEvent::Fault(what) => format!("guest fault: {what}"),
            VmEvent::Shutdown { force: false } => "shut down through the API".into(),
            VmEvent::Shutdown { force: true } => "shut down at once through the API".into(),
        }
    }
}
