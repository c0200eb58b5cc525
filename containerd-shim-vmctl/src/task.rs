//! The task service containerd calls (task v2): one task, one VM, each
//! call mapped onto a vmctl verb.
//!
//! | call | what the VM does |
//! |---|---|
//! | Create | the image's unpacked layers into vmctl's store (`vmctl image import`), the VM defined on them (`vmctl create`) |
//! | Start | `vmctl start`; the console followed into the task's stdout; a thread waits for the end (`vmctl wait`) and publishes TaskExit with the guest's status |
//! | Kill | SIGTERM, SIGINT, SIGHUP, SIGQUIT: `vmctl stop` (graceful; the engine sends SIGKILL after its own grace); SIGKILL: `vmctl kill` (status 137) |
//! | Pause, Resume | `vmctl pause`, `vmctl resume` |
//! | State, Wait, Pids, Connect | from the shim's record (the vmm's pid is the task's) |
//! | Stats | CPU and memory of the vmm (and its own disk backend) from /proc |
//! | Delete | `vmctl delete --force` |
//! | Shutdown | the shim ends once its task is deleted |
//!
//! A pod's sandbox task (the CRI's pause container) gets no VM: it lives
//! from Start until Kill, and the pod's VMs are its containers.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExit, TaskIO, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};

use crate::events::Events;
use crate::spec::{layer_dirs, TaskSpec};
use crate::vmctl::{vm_name, Vmctl};
use crate::{console, stats, Error};

const SIGKILL: u32 = 9;

fn status(code: Code, msg: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()))
}

fn unimplemented(what: &str) -> ttrpc::Error {
    status(Code::UNIMPLEMENTED, format!("{what}: not for a VM task"))
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> ttrpc::Error {
        let code = match e {
            Error::Bundle(_) => Code::INVALID_ARGUMENT,
            Error::Vmctl(_) => Code::UNKNOWN,
        };
        status(code, e)
    }
}

struct Task {
    id: String,
    bundle: String,
    /// None: a pod's sandbox.
    vm: Option<String>,
    stdout: String,
    stdin: String,
    stderr: String,
    terminal: bool,
    status: api::Status,
    pid: u32,
    exit: Option<(u32, Timestamp)>,
    /// A graceful stop under way (another SIGTERM adds nothing): its
    /// `vmctl stop`, which a SIGKILL ends first.
    stopping: Option<OwnedFd>,
}

#[derive(Default)]
struct Record {
    task: Mutex<Option<Task>>,
    changed: Condvar,
}

#[derive(Clone)]
pub struct Service {
    record: Arc<Record>,
    events: Events,
    exit: Arc<ExitSignal>,
    namespace: String,
    vmctl: Arc<Vmctl>,
}

impl Service {
    pub fn new(namespace: String, exit: Arc<ExitSignal>, events: Events) -> Service {
        Service {
            record: Arc::default(),
            events,
            exit,
            namespace,
            vmctl: Arc::new(Vmctl::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Task>> {
        self.record.task.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The task `id` names, for a call on it (an exec id: none exist).
    fn task<'a>(
        guard: &'a mut MutexGuard<'_, Option<Task>>,
        id: &str,
        exec_id: &str,
    ) -> TtrpcResult<&'a mut Task> {
        if !exec_id.is_empty() {
            return Err(status(
                Code::NOT_FOUND,
                format!("exec {exec_id}: a VM task has no execs"),
            ));
        }
        match guard.as_mut() {
            Some(t) if t.id == id => Ok(t),
            _ => Err(status(Code::NOT_FOUND, format!("task {id}: not here"))),
        }
    }

    /// The task ended with `code`: recorded, waiters woken, TaskExit sent.
    fn finish(&self, code: u32) {
        let mut g = self.lock();
        let Some(t) = g.as_mut() else { return };
        if t.exit.is_some() {
            return;
        }
        let at = Timestamp::now();
        t.exit = Some((code, at.clone()));
        t.status = api::Status::STOPPED;
        let mut e = TaskExit::new();
        e.container_id = t.id.clone();
        e.id = t.id.clone();
        e.pid = t.pid;
        e.exit_status = code;
        e.exited_at = MessageField::some(at);
        self.events.send(topics::TASK_EXIT_EVENT_TOPIC, e);
        self.record.changed.notify_all();
    }

    /// Until VM `name` ends (and its console has reached stdout): finish.
    fn watch(&self, name: String, console: Option<std::process::Child>) {
        let me = self.clone();
        std::thread::spawn(move || {
            let code = match me.vmctl.wait(&name) {
                Ok(row) => row.exit_status.map_or(255, |c| c as u32),
                Err(e) => {
                    tracing::warn!("waiting for VM {name}: {e}");
                    255
                }
            };
            if let Some(mut c) = console {
                let _ = c.wait();
            }
            me.finish(code);
        });
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.lock().is_some() {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("task {}: this shim has a task", req.id),
            ));
        }
        let began = std::time::Instant::now();
        let spec = TaskSpec::of_bundle(std::path::Path::new(&req.bundle))?;
        let vm = if spec.sandbox {
            None
        } else {
            let dirs = layer_dirs(&req.rootfs)?;
            // (A VM a dead shim left is removed by the `delete` action
            // containerd runs for it.)
            let name = vm_name(&self.namespace, &req.id);
            let image = self.vmctl.import(&dirs)?;
            self.vmctl.create(&name, &image, &spec.vm)?;
            tracing::info!(
                "task {}: VM {name} on {} ({} layers restored), defined in {} ms",
                req.id,
                image.top.display(),
                image.restored.len(),
                began.elapsed().as_millis()
            );
            Some(name)
        };
        let mut g = self.lock();
        *g = Some(Task {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            vm,
            stdout: req.stdout.clone(),
            stdin: req.stdin.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            status: api::Status::CREATED,
            pid: 0,
            exit: None,
            stopping: None,
        });
        let mut e = TaskCreate::new();
        e.container_id = req.id.clone();
        e.bundle = req.bundle.clone();
        e.rootfs = req.rootfs.clone();
        let mut io = TaskIO::new();
        io.stdin = req.stdin.clone();
        io.stdout = req.stdout.clone();
        io.stderr = req.stderr.clone();
        io.terminal = req.terminal;
        e.io = MessageField::some(io);
        self.events.send(topics::TASK_CREATE_EVENT_TOPIC, e);
        Ok(api::CreateTaskResponse::new())
    }

    fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let (vm, stdout) = {
            let mut g = self.lock();
            let t = Self::task(&mut g, &req.id, &req.exec_id)?;
            if t.status != api::Status::CREATED {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("task {}: started already", t.id),
                ));
            }
            (t.vm.clone(), t.stdout.clone())
        };
        let began = std::time::Instant::now();
        let pid = match &vm {
            None => std::process::id(),
            Some(name) => {
                let out = console::open_stdout(&stdout)?;
                let pid = self.vmctl.start(name)?;
                let follower = out
                    .map(|f| self.vmctl.follow_console(name, f))
                    .transpose()?;
                self.watch(name.clone(), follower);
                tracing::info!(
                    "task {}: VM {name} started in {} ms",
                    req.id,
                    began.elapsed().as_millis()
                );
                pid
            }
        };
        let mut g = self.lock();
        let t = Self::task(&mut g, &req.id, "")?;
        t.pid = pid;
        if t.exit.is_none() {
            t.status = api::Status::RUNNING;
        }
        let mut e = TaskStart::new();
        e.container_id = t.id.clone();
        e.pid = pid;
        self.events.send(topics::TASK_START_EVENT_TOPIC, e);
        let mut r = api::StartResponse::new();
        r.pid = pid;
        Ok(r)
    }

    fn state(&self, _: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let mut g = self.lock();
        let t = Self::task(&mut g, &req.id, &req.exec_id)?;
        let mut r = api::StateResponse::new();
        r.id = t.id.clone();
        r.bundle = t.bundle.clone();
        r.pid = t.pid;
        r.status = t.status.into();
        r.stdin = t.stdin.clone();
        r.stdout = t.stdout.clone();
        r.stderr = t.stderr.clone();
        r.terminal = t.terminal;
        if let Some((code, at)) = &t.exit {
            r.exit_status = *code;
            r.exited_at = MessageField::some(at.clone());
        }
        Ok(r)
    }

    fn wait(&self, _: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut g = self.lock();
        loop {
            let t = Self::task(&mut g, &req.id, &req.exec_id)?;
            if let Some((code, at)) = &t.exit {
                let mut r = api::WaitResponse::new();
                r.exit_status = *code;
                r.exited_at = MessageField::some(at.clone());
                return Ok(r);
            }
            g = self
                .record
                .changed
                .wait(g)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let graceful = matches!(req.signal, 1 | 2 | 3 | 15);
        if req.signal != 0 && !graceful && req.signal != SIGKILL {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("signal {}: a VM takes SIGTERM, SIGINT, SIGHUP or SIGQUIT (a graceful stop) and SIGKILL", req.signal),
            ));
        }
        let (vm, running, stopping) = {
            let mut g = self.lock();
            let t = Self::task(&mut g, &req.id, &req.exec_id)?;
            let stopping = if req.signal == SIGKILL {
                t.stopping.take()
            } else {
                t.stopping.as_ref().and_then(|fd| fd.try_clone().ok())
            };
            (
                t.vm.clone(),
                t.exit.is_none() && t.status != api::Status::CREATED,
                stopping,
            )
        };
        if req.signal == 0 {
            return Ok(api::Empty::new());
        }
        match vm {
            // The sandbox, or a VM that never started: it ends here.
            None => self.finish(128 + req.signal),
            Some(_) if !running => {
                if self.lock().as_ref().is_some_and(|t| t.exit.is_none()) {
                    self.finish(128 + req.signal);
                }
            }
            Some(name) if req.signal == SIGKILL => {
                if let Some(stop) = stopping {
                    // It holds the VM's lock while it waits: ended first.
                    let _ =
                        rustix::process::pidfd_send_signal(&stop, rustix::process::Signal::KILL);
                }
                if let Err(e) = self.vmctl.verb("kill", &name, &[]) {
                    // Ended meanwhile (its graceful stop, or the guest):
                    // nothing left to kill.
                    let info = self.vmctl.info(&name)?;
                    if matches!(info.state.as_str(), "running" | "paused" | "starting") {
                        return Err(e.into());
                    }
                }
            }
            Some(_) if stopping.is_some() => {}
            Some(name) => self.stop_gracefully(&req.id, name)?,
        }
        Ok(api::Empty::new())
    }

    fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.pause_or_resume(&req.id, true)
    }

    fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.pause_or_resume(&req.id, false)
    }

    fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let vm = {
            let mut g = self.lock();
            let t = Self::task(&mut g, &req.id, &req.exec_id)?;
            if t.exit.is_none() && t.status != api::Status::CREATED {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("task {}: it runs (kill it first)", t.id),
                ));
            }
            t.vm.clone()
        };
        if let Some(name) = &vm {
            self.vmctl.delete(name)?;
        }
        let t = self
            .lock()
            .take()
            .ok_or_else(|| status(Code::NOT_FOUND, "deleted already"))?;
        let (code, at) = t.exit.unwrap_or((0, Timestamp::now()));
        let mut e = TaskDelete::new();
        e.container_id = t.id.clone();
        e.id = t.id.clone();
        e.pid = t.pid;
        e.exit_status = code;
        e.exited_at = MessageField::some(at.clone());
        self.events.send(topics::TASK_DELETE_EVENT_TOPIC, e);
        self.record.changed.notify_all();
        let mut r = api::DeleteResponse::new();
        r.pid = t.pid;
        r.exit_status = code;
        r.exited_at = MessageField::some(at);
        Ok(r)
    }

    fn pids(&self, _: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let mut g = self.lock();
        let t = Self::task(&mut g, &req.id, "")?;
        let mut r = api::PidsResponse::new();
        if t.pid != 0 && t.exit.is_none() {
            let mut p = ProcessInfo::new();
            p.pid = t.pid;
            r.processes.push(p);
        }
        Ok(r)
    }

    fn connect(
        &self,
        _: &TtrpcContext,
        _: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let mut r = api::ConnectResponse::new();
        r.shim_pid = std::process::id();
        r.task_pid = self.lock().as_ref().map_or(0, |t| t.pid);
        r.version = env!("CARGO_PKG_VERSION").into();
        Ok(r)
    }

    fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.lock().is_none() {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }

    fn stats(&self, _: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let vm = {
            let mut g = self.lock();
            Self::task(&mut g, &req.id, "")?.vm.clone()
        };
        let mut pids = vec![];
        if let Some(info) = vm.as_deref().map(|n| self.vmctl.info(n)).transpose()? {
            pids.extend(info.pid);
            if info.backend == "vm" {
                pids.extend(info.backend_pid);
            }
        }
        let any = containerd_shim::util::convert_to_any(Box::new(stats::of(&pids)))
            .map_err(|e| status(Code::INTERNAL, e))?;
        let mut r = api::StatsResponse::new();
        r.stats = MessageField::some(any);
        Ok(r)
    }

    fn close_io(&self, _: &TtrpcContext, _: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        Ok(api::Empty::new())
    }

    fn exec(&self, _: &TtrpcContext, _: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("exec"))
    }

    fn resize_pty(&self, _: &TtrpcContext, _: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("resize_pty"))
    }

    fn checkpoint(
        &self,
        _: &TtrpcContext,
        _: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unimplemented("checkpoint (vmctl snapshot takes a VM's)"))
    }

    fn update(&self, _: &TtrpcContext, _: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented(
            "update (vmctl set changes a VM from its next start)",
        ))
    }
}

impl Service {
    /// `vmctl stop` in the background, its deadline `VMCTL_STOP_TIMEOUT`
    /// seconds (30 by default, Kubernetes' default grace: the engine
    /// usually sends SIGKILL itself when its own grace is over).
    fn stop_gracefully(&self, id: &str, name: String) -> TtrpcResult<()> {
        let timeout = std::env::var("VMCTL_STOP_TIMEOUT")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(30);
        let mut child = self.vmctl.spawn_stop(&name, timeout)?;
        let pidfd = rustix::process::Pid::from_child(&child);
        let pidfd = rustix::process::pidfd_open(pidfd, rustix::process::PidfdFlags::empty())
            .map_err(|e| status(Code::INTERNAL, format!("pidfd of vmctl stop: {e}")))?;
        {
            let mut g = self.lock();
            if let Ok(t) = Self::task(&mut g, id, "") {
                t.stopping = Some(pidfd);
            }
        }
        let me = self.clone();
        let id = id.to_string();
        std::thread::spawn(move || {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            match child.wait() {
                Ok(st) if !st.success() => {
                    tracing::warn!("stopping VM {name}: {st}: {}", err.trim())
                }
                Err(e) => tracing::warn!("stopping VM {name}: {e}"),
                Ok(_) => {}
            }
            let mut g = me.lock();
            if let Ok(t) = Self::task(&mut g, &id, "") {
                t.stopping = None;
            }
        });
        Ok(())
    }

    fn pause_or_resume(&self, id: &str, pause: bool) -> TtrpcResult<api::Empty> {
        let vm = {
            let mut g = self.lock();
            let t = Self::task(&mut g, id, "")?;
            let from = if pause {
                api::Status::RUNNING
            } else {
                api::Status::PAUSED
            };
            if t.status != from {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("task {id}: {:?}, not {from:?}", t.status),
                ));
            }
            t.vm.clone()
        };
        if let Some(name) = &vm {
            self.vmctl
                .verb(if pause { "pause" } else { "resume" }, name, &[])?;
        }
        let mut g = self.lock();
        let t = Self::task(&mut g, id, "")?;
        if t.exit.is_none() {
            t.status = if pause {
                api::Status::PAUSED
            } else {
                api::Status::RUNNING
            };
        }
        if pause {
            let mut e = TaskPaused::new();
            e.container_id = id.into();
            self.events.send(topics::TASK_PAUSED_EVENT_TOPIC, e);
        } else {
            let mut e = TaskResumed::new();
            e.container_id = id.into();
            self.events.send(topics::TASK_RESUMED_EVENT_TOPIC, e);
        }
        Ok(api::Empty::new())
    }
}
