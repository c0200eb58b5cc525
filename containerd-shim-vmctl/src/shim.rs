//! The shim's process roles as containerd runs them: `start` (fork the
//! daemon, print its address), the daemon (serve `task::Service`), and
//! `delete` (a fresh process after a daemon died: remove the task's VM).

use std::sync::Arc;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

use crate::events::Events;
use crate::task::Service;
use crate::vmctl::{vm_name, Vmctl};

pub const RUNTIME_ID: &str = "io.containerd.vmctl.v1";

pub struct VmShim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for VmShim {
    type T = Service;

    fn new(_runtime_id: &str, flags: &Flags, _config: &mut Config) -> Self {
        VmShim {
            namespace: flags.namespace.clone(),
            id: flags.id.clone(),
            exit: Arc::default(),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // One daemon per task (grouped by its id).
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let name = vm_name(&self.namespace, &self.id);
        Vmctl::new()
            .delete(&name)
            .map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
        let mut r = DeleteResponse::new();
        // As runc's shim answers for a task whose shim died: killed.
        r.exit_status = 137;
        r.exited_at = MessageField::some(Timestamp::now());
        Ok(r)
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        let events = Events::start(publisher, self.namespace.clone());
        Service::new(self.namespace.clone(), self.exit.clone(), events)
    }
}
