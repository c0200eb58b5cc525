//! MSI routing: the GSIs the VM's devices signal through irqfds, and the
//! (address, data) KVM delivers for each (below `vm`, so that devices
//! route their vectors without depending on the machine).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQ_ROUTING_MSI};
use kvm_ioctls::VmFd;
use tracing::warn;

/// MSI routes of the VM's GSIs; every change replaces KVM's whole table.
pub struct MsiRouter {
    vm: Arc<VmFd>,
    /// The next free GSI, and each routed GSI's (address, data).
    state: Mutex<(u32, Routes)>,
}

type Routes = BTreeMap<u32, (u64, u32)>;

/// GSIs below this are the interrupt controllers' legacy lines.
const FIRST_MSI_GSI: u32 = 24;

impl MsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        MsiRouter {
            vm,
            state: Mutex::new((FIRST_MSI_GSI, BTreeMap::new())),
        }
    }

    pub fn allocate(&self) -> u32 {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 += 1;
        st.0 - 1
    }

    /// Routes `gsi` to an MSI (address, data), or nowhere.
    pub fn set(&self, gsi: u32, msi: Option<(u64, u32)>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match msi {
            Some(m) => st.1.insert(gsi, m),
            None => st.1.remove(&gsi),
        };
        let Ok(mut table) = KvmIrqRouting::new(st.1.len()) else {
            warn!("cannot build the MSI routing table");
            return;
        };
        for (slot, (&gsi, &(addr, data))) in table.as_mut_slice().iter_mut().zip(st.1.iter()) {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = addr as u32;
            e.u.msi.address_hi = (addr >> 32) as u32;
            e.u.msi.data = data;
            *slot = e;
        }
        if let Err(e) = self.vm.set_gsi_routing(&table) {
            warn!("KVM_SET_GSI_ROUTING: {e}");
        }
    }
}
