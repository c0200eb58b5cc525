//! The test-guest exit port (QEMU's isa-debug-exit at 0xf4): the value a
//! guest writes there ends the VM, and becomes the vmm's exit status.

use crossbeam_channel::Sender;

use super::BusDevice;
use crate::events::VmEvent;

pub const PORT: u64 = 0xf4;
pub const LEN: u64 = 4;

pub struct DebugExit {
    events: Sender<VmEvent>,
}

impl DebugExit {
    pub fn new(events: Sender<VmEvent>) -> Self {
        DebugExit { events }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let _ = self.events.send(VmEvent::GuestExit(data[0]));
    }
}
