//! `vmm`: owns vCPUs and guest memory; its disks are vhost-user-blk devices
//! served by `blk-backend`. Not built yet: see docs/architecture.md for the plan.
