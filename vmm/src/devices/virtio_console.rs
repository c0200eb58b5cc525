//! virtio-console (virtio 1.x, section 5.3): the guest's console as a
//! queue of buffers, beside the 8250 UART and written to the same output.
//!
//! A UART takes one port write per byte, and under PVM every one of them
//! traps and is emulated: about 4.4 us a byte, 3.6 ms for the 800 bytes a
//! 1-I/O bench guest reports, more than the rest of its run. Here the
//! guest hands over a whole line in one descriptor and rings the queue's
//! doorbell (a KVM ioeventfd: no exit to this process); the vmm's console
//! thread wakes on it, copies the line out and returns the buffer.
//!
//! One port, no MULTIPORT, no console size: the guest's `hvc0` (Linux:
//! `console=hvc0`). Output only, like the UART here: nothing is ever put
//! on the receive queue.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::virtio_pci::{DeviceError, Interrupts, QueueConfig, VirtioDevice};
use cli_support::log_limit::LogLimit;

const DEVICE_ID: u16 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE as u16;
const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// receiveq0 (host to guest) and transmitq0 (guest to host).
const QUEUES: u16 = 2;
const TRANSMIT: usize = 1;
const QUEUE_SIZE: u16 = 64;
/// What one descriptor may carry into the console: a guest's buffer of
/// any length must not make the vmm allocate that much.
const MAX_DESCRIPTOR_BYTES: usize = 64 << 10;

/// The transmit queue as the driver set it up.
struct Transmit {
    queue: Queue,
    kick: EventFd,
    interrupt: Option<EventFd>,
}

/// The console's transmit side, shared by the device (the vCPU thread
/// that sets it up), the console thread that empties it, and the main
/// thread that empties it once more as the VM ends.
pub struct ConsolePort {
    mem: GuestMemoryMmap,
    transmit: Mutex<Option<Transmit>>,
    /// Written when the queue is set up or reset: the console thread then
    /// looks again at what it should wait on.
    changed: EventFd,
    errors: Mutex<LogLimit>,
}

impl ConsolePort {
    pub fn new(mem: GuestMemoryMmap) -> std::io::Result<Arc<ConsolePort>> {
        Ok(Arc::new(ConsolePort {
            mem,
            transmit: Mutex::new(None),
            changed: EventFd::new(EFD_NONBLOCK)?,
            errors: Mutex::new(LogLimit::default()),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Option<Transmit>> {
        self.transmit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The descriptors the console thread waits on: the set-up changes,
    /// and the transmit queue's doorbell once there is one. Reading them
    /// clears them.
    pub fn wait_fds(&self) -> (RawFd, Option<RawFd>) {
        let kick = self.state().as_ref().map(|t| t.kick.as_raw_fd());
        (self.changed.as_raw_fd(), kick)
    }

    /// Clears the doorbells (they are level: a count until read).
    pub fn clear_doorbells(&self) {
        let _ = self.changed.read();
        if let Some(t) = self.state().as_ref() {
            let _ = t.kick.read();
        }
    }

    fn error(&self, what: std::fmt::Arguments) {
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).emit(
            || warn!("virtio-console: {what}"),
            |n| warn!("virtio-console: {n} more errors (not logged one by one)"),
        );
    }

    /// Hands every buffer the guest queued for output to `out`, in order,
    /// returns them to the guest, and interrupts it if it asked to be.
    /// Returns the bytes moved.
    pub fn transmit(&self, out: &mut dyn FnMut(&[u8])) -> usize {
        let mut state = self.state();
        let Some(t) = state.as_mut() else {
            return 0;
        };
        let mut moved = 0;
        let mut buf = Vec::new();
        while let Some(chain) = t.queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            for d in chain.readable() {
                let len = (d.len() as usize).min(MAX_DESCRIPTOR_BYTES);
                buf.resize(len, 0);
                match self.mem.read_slice(&mut buf, d.addr()) {
                    Ok(()) => {
                        out(&buf);
                        moved += len;
                    }
                    Err(e) => self.error(format_args!(
                        "a buffer at {:#x} (+{len}) outside guest memory: {e}",
                        d.addr().0
                    )),
                }
            }
            if let Err(e) = t.queue.add_used(&self.mem, head, 0) {
                self.error(format_args!("returning buffer {head}: {e}"));
                // The used ring is not where the driver said: stop here
                // rather than loop on it.
                break;
            }
        }
        if let Some(fd) = &t.interrupt {
            if t.queue.needs_notification(&self.mem).unwrap_or(true) {
                let _ = fd.write(1);
            }
        }
        moved
    }
}

/// The device the transport sees.
pub struct VirtioConsole {
    port: Arc<ConsolePort>,
}

impl VirtioConsole {
    pub fn new(port: Arc<ConsolePort>) -> Self {
        VirtioConsole { port }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConsoleError {
    #[error("transmit queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("transmit queue: its rings are not in guest memory")]
    RingOutside,
    #[error("transmit queue's doorbell: {0}")]
    Eventfd(std::io::Error),
    #[error("the transport handed over no doorbell for the transmit queue")]
    NoDoorbell,
}

impl VirtioDevice for VirtioConsole {
    fn device_id(&self) -> u16 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn num_queues(&self) -> u16 {
        QUEUES
    }

    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    /// cols, rows, max_nr_ports, emerg_wr: all zero, none of their
    /// features being offered.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        features: u64,
        queues: &[QueueConfig],
        kicks: &[EventFd],
        interrupts: &dyn Interrupts,
    ) -> Result<(), DeviceError> {
        let Some(q) = queues.get(TRANSMIT).filter(|q| q.enabled) else {
            // A driver that only reads: nothing to serve.
            return Ok(());
        };
        let mut queue = Queue::new(q.max_size).map_err(ConsoleError::Queue)?;
        queue.set_size(q.size);
        let halves = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = halves(q.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = halves(q.avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = halves(q.used);
        queue.set_used_ring_address(lo, hi);
        queue.set_event_idx(
            features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0,
        );
        queue.set_ready(true);
        if !queue.is_valid(&self.port.mem) {
            return Err(Box::new(ConsoleError::RingOutside));
        }
        let kick = kicks
            .get(TRANSMIT)
            .ok_or(ConsoleError::NoDoorbell)?
            .try_clone()
            .map_err(ConsoleError::Eventfd)?;
        let interrupt = interrupts
            .notifier(q.vector)
            .map(EventFd::try_clone)
            .transpose()
            .map_err(ConsoleError::Eventfd)?;
        *self.port.state() = Some(Transmit {
            queue,
            kick,
            interrupt,
        });
        let _ = self.port.changed.write(1);
        Ok(())
    }

    /// The transmit queue's positions (the snapshot drains the console
    /// first, so nothing is between them and the used ring).
    fn save_state(&self) -> serde_json::Value {
        match self.port.state().as_ref() {
            Some(t) => serde_json::json!({
                "next_avail": t.queue.next_avail(),
                "next_used": t.queue.next_used(),
            }),
            None => serde_json::Value::Null,
        }
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceError> {
        if let Some(t) = self.port.state().as_mut() {
            let at = |k: &str| state[k].as_u64().map(|v| v as u16);
            if let (Some(avail), Some(used)) = (at("next_avail"), at("next_used")) {
                t.queue.set_next_avail(avail);
                t.queue.set_next_used(used);
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        *self.port.state() = None;
        let _ = self.port.changed.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    struct NoInterrupts;
    impl Interrupts for NoInterrupts {
        fn notifier(&self, _vector: u16) -> Option<&EventFd> {
            None
        }
    }

    /// A console whose transmit queue's rings are at (desc, avail, used):
    /// the port, and the activation's outcome.
    fn activated(
        mem: &GuestMemoryMmap,
        (desc, avail, used): (u64, u64, u64),
    ) -> (VirtioConsole, Arc<ConsolePort>, Result<(), DeviceError>) {
        let port = ConsolePort::new(mem.clone()).expect("eventfd");
        let mut dev = VirtioConsole::new(Arc::clone(&port));
        let q = QueueConfig {
            size: 16,
            max_size: QUEUE_SIZE,
            vector: super::super::virtio_pci::NO_VECTOR,
            enabled: true,
            desc,
            avail,
            used,
        };
        let kicks = [
            EventFd::new(0).expect("eventfd"),
            EventFd::new(0).expect("eventfd"),
        ];
        let r = dev.activate(
            VIRTIO_F_VERSION_1,
            &[QueueConfig::default(), q],
            &kicks,
            &NoInterrupts,
        );
        (dev, port, r)
    }

    /// A console whose transmit queue is `vq`'s rings in `mem`.
    fn console_on(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
    ) -> (VirtioConsole, Arc<ConsolePort>) {
        let rings = (vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
        let (dev, port, r) = activated(mem, rings);
        r.expect("activates");
        (dev, port)
    }

    #[test]
    fn lines_come_out_in_order_and_buffers_go_back() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        let vq = MockSplitQueue::new(&mem, 16);
        mem.write_slice(b"hello ", GuestAddress(0x8000))
            .expect("write");
        mem.write_slice(b"world\n", GuestAddress(0x9000))
            .expect("write");
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x8000, 6, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x9000, 6, 0, 0)),
        ];
        vq.add_desc_chains(&descs, 0).expect("chains");
        let (_dev, port) = console_on(&mem, &vq);
        let mut out = Vec::new();
        assert_eq!(port.transmit(&mut |b| out.extend_from_slice(b)), 12);
        assert_eq!(out, b"hello world\n");
        let used_idx: u16 = mem
            .read_obj(GuestAddress(vq.used_addr().0 + 2))
            .expect("used idx");
        assert_eq!(used_idx, 2, "both buffers returned");
        assert_eq!(
            port.transmit(&mut |b| out.extend_from_slice(b)),
            0,
            "nothing twice"
        );
    }

    #[test]
    fn a_hostile_buffer_is_bounded_or_refused() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [
            // 4 GiB claimed: at most MAX_DESCRIPTOR_BYTES are read, and
            // those run off the end of memory: refused.
            RawDescriptor::from(SplitDescriptor::new(0xf_0000, u32::MAX, 0, 0)),
            // Outside guest memory altogether.
            RawDescriptor::from(SplitDescriptor::new(0x4000_0000, 16, 0, 0)),
            // A sane one after them still comes out.
            RawDescriptor::from(SplitDescriptor::new(0x8000, 3, 0, 0)),
        ];
        mem.write_slice(b"ok\n", GuestAddress(0x8000))
            .expect("write");
        vq.add_desc_chains(&descs, 0).expect("chains");
        let (_dev, port) = console_on(&mem, &vq);
        let mut out = Vec::new();
        port.transmit(&mut |b| out.extend_from_slice(b));
        assert!(out.len() <= MAX_DESCRIPTOR_BYTES + 3, "{} bytes", out.len());
        assert!(out.ends_with(b"ok\n"));
    }

    #[test]
    fn rings_outside_memory_fail_activation_and_reset_stops_output() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        let (_dev, port, r) = activated(&mem, (0x8000_0000, 0x1000, 0x2000));
        let e = r.expect_err("refused");
        assert!(e.to_string().contains("not in guest memory"), "{e}");
        assert_eq!(port.wait_fds().1, None);

        let vq = MockSplitQueue::new(&mem, 16);
        let (mut dev, port) = console_on(&mem, &vq);
        assert!(port.wait_fds().1.is_some());
        dev.reset();
        assert_eq!(port.wait_fds().1, None);
        assert_eq!(port.transmit(&mut |_| panic!("no output after reset")), 0);
    }
}
