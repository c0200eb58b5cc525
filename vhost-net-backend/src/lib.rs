//! A vhost-user-net backend over a multi-queue tap (`net-backend`): the
//! vmm's `--net` NICs, and QEMU's `-netdev vhost-user`, move their frames
//! through it. `tap`: the tap's queues and offloads; `device`: the
//! virtio-net queues, each pair on a worker of its own.

pub mod device;
pub mod tap;
