//! A one-node Slurm cluster of a test's own (Debian's slurm-wlm 22.05):
//! munged with a fresh key on a private socket, slurmctld and slurmd on
//! free 127.0.0.1 ports, every file under the test's directory; jobs see
//! `SLURM_CONF` and the environment given. Stopped on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::patience::Patience;
use crate::workspace::output_within;

pub struct LocalSlurm {
    children: Vec<Child>,
    pub conf: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

/// One array task of a job, as `scontrol show job` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    pub task: Option<u32>,
    pub state: String,
    /// `ExitCode=N:S`: the exit status, and the signal that ended it.
    pub exit: (i32, i32),
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(program: &str, args: &[&str], log: &Path, env: &[(&str, &Path)]) -> Result<Child> {
    let mut c = Command::new(program);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log)?)
        .stderr(std::fs::OpenOptions::new().append(true).open(log)?);
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().with_context(|| format!("starting {program}"))
}

impl LocalSlurm {
    /// The cluster under `dir`; `env`: what every job's environment adds
    /// (sbatch passes the submitter's environment on).
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Result<LocalSlurm> {
        std::fs::create_dir_all(dir.join("ctld"))?;
        std::fs::create_dir_all(dir.join("spool"))?;
        let mut slurm = LocalSlurm {
            children: Vec::new(),
            conf: dir.join("slurm.conf"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir: dir.to_path_buf(),
        };
        // munge: a key of its own (mode 0400, as munged demands), in the
        // foreground so that it is a child.
        let key = dir.join("munge.key");
        let mut bytes = [0u8; 1024];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
        std::fs::write(&key, bytes)?;
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
        let sock = dir.join("munge.sock");
        let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
        slurm.children.push(spawn(
            "munged",
            &[
                "--foreground",
                "--force",
                &format!("--key-file={}", key.display()),
                &format!("--socket={}", sock.display()),
                &format!("--log-file={}", p("munged.log")),
                &format!("--pid-file={}", p("munged.pid")),
                &format!("--seed-file={}", p("munged.seed")),
            ],
            &dir.join("munged.out"),
            &[],
        )?);
        Patience::new("munged listening", Duration::from_millis(100))
            .wait_until(|| Ok(sock.exists()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")?
            .trim()
            .to_string();
        let (ctld_port, d_port) = (free_port()?, free_port()?);
        std::fs::write(
            &slurm.conf,
            format!(
                "ClusterName=vmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={ctld}
SlurmdSpoolDir={spool}
SlurmctldPidFile={ctld_pid}
SlurmdPidFile={d_pid}
SlurmctldLogFile={ctld_log}
SlurmdLogFile={d_log}
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
NodeName=vmnode NodeHostname={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=vms Nodes=vmnode Default=YES MaxTime=INFINITE State=UP
",
                sock = sock.display(),
                ctld = p("ctld"),
                spool = p("spool"),
                ctld_pid = p("slurmctld.pid"),
                d_pid = p("slurmd.pid"),
                ctld_log = p("slurmctld.log"),
                d_log = p("slurmd.log"),
            ),
        )?;
        let conf = slurm.conf.clone();
        let conf_s = conf.to_string_lossy().into_owned();
        let env = [("SLURM_CONF", conf.as_path())];
        slurm.children.push(spawn(
            "slurmctld",
            &["-D", "-f", &conf_s],
            &dir.join("slurmctld.out"),
            &env,
        )?);
        slurm.children.push(spawn(
            "slurmd",
            &["-D", "-N", "vmnode", "-f", &conf_s],
            &dir.join("slurmd.out"),
            &env,
        )?);
        // The node is idle once slurmd registered (a second or two).
        let idle = Patience::new("the Slurm node idle", Duration::from_secs(2)).wait_until(|| {
            for c in slurm.children.iter_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("a Slurm daemon ended ({st}); see {}", slurm.dir.display());
                }
            }
            let out = slurm.command("sinfo", &["-h", "-o", "%t"], Duration::from_secs(1));
            Ok(String::from_utf8_lossy(&out.stdout).trim() == "idle")
        });
        idle?;
        Ok(slurm)
    }

    /// A Slurm client command on this cluster, bounded by `measured`.
    pub fn command(&self, program: &str, args: &[&str], measured: Duration) -> Output {
        let mut c = Command::new(program);
        c.args(args).env("SLURM_CONF", &self.conf);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        output_within(
            &mut c,
            &Patience::new(format!("{program} {args:?}"), measured),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `sbatch ARGS` (`--parsable` added): the job's id.
    pub fn sbatch(&self, args: &[&str]) -> u32 {
        let mut all = vec!["--parsable"];
        all.extend_from_slice(args);
        let out = self.command("sbatch", &all, Duration::from_secs(1));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "sbatch {args:?}: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        said.trim()
            .split(';')
            .next()
            .and_then(|j| j.parse().ok())
            .unwrap_or_else(|| panic!("sbatch said {said:?}"))
    }

    /// Every task of job `id` (an array's, or the job itself).
    pub fn tasks(&self, id: u32) -> Vec<TaskState> {
        let out = self.command(
            "scontrol",
            &["-o", "show", "job", &id.to_string()],
            Duration::from_secs(1),
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let field = |k: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(&format!("{k}=")))
                        .map(String::from)
                };
                let exit = field("ExitCode")?;
                let (code, sig) = exit.split_once(':')?;
                Some(TaskState {
                    task: field("ArrayTaskId").and_then(|t| t.parse().ok()),
                    state: field("JobState")?,
                    exit: (code.parse().ok()?, sig.parse().ok()?),
                })
            })
            .collect()
    }

    /// Until every task of job `id` has ended: their states.
    pub fn wait_job(&self, id: u32, measured: Duration) -> Vec<TaskState> {
        let ended = |t: &TaskState| {
            !matches!(
                t.state.as_str(),
                "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING"
            )
        };
        let mut last = Vec::new();
        Patience::new(format!("Slurm job {id} ended"), measured)
            .wait_until(|| {
                last = self.tasks(id);
                // A pending array is one record until its tasks start.
                Ok(!last.is_empty()
                    && last.iter().all(ended)
                    && last.iter().all(|t| t.task.is_some()))
            })
            .unwrap_or_else(|e| panic!("{e}: {last:?}"));
        last
    }
}

impl Drop for LocalSlurm {
    fn drop(&mut self) {
        // slurmd first (it ends its jobs' steps), then the controller,
        // then munge.
        for c in self.children.iter_mut().rev() {
            // SAFETY: kill(2) on a child this struct owns, not yet reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}
