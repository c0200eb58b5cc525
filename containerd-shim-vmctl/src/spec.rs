//! What a task's bundle and rootfs say about its VM: the OCI runtime spec
//! containerd wrote (`config.json`: the image's Cmd and Env, a pod's
//! resources and annotations) and the snapshotter's mounts (the image's
//! unpacked layers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;
use serde::Deserialize;
use vm_oci::VmDefaults;

use crate::Error;

/// The annotation the CRI puts on a pod's sandbox task and its containers.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// The parts of the OCI runtime spec a VM is made from.
#[derive(Debug, Default, Deserialize)]
struct Spec {
    #[serde(default)]
    process: Option<Process>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    linux: Option<Linux>,
}

#[derive(Debug, Default, Deserialize)]
struct Process {
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Linux {
    #[serde(default)]
    resources: Option<Resources>,
}

#[derive(Debug, Default, Deserialize)]
struct Resources {
    #[serde(default)]
    memory: Option<MemoryLimit>,
    #[serde(default)]
    cpu: Option<CpuLimit>,
}

#[derive(Debug, Default, Deserialize)]
struct MemoryLimit {
    limit: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct CpuLimit {
    quota: Option<i64>,
    period: Option<u64>,
}

/// A task as the shim runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    /// A pod's sandbox (the CRI's pause container): it gets no VM, only
    /// a life that Kill ends (the pod's VMs are its containers).
    pub sandbox: bool,
    /// cpus, memory and command line: the image's (Env, Cmd) as the
    /// engine passed them, overridden by a pod's limits (memory limit;
    /// the CPU quota rounded up to whole vCPUs).
    pub vm: VmDefaults,
}

impl TaskSpec {
    pub fn of_bundle(bundle: &Path) -> Result<TaskSpec, Error> {
        let path = bundle.join("config.json");
        let text =
            std::fs::read(&path).map_err(|e| Error::Bundle(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Error::Bundle(format!("{}: {e}", path.display())))
    }

    fn parse(text: &[u8]) -> Result<TaskSpec, String> {
        let spec: Spec = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        let process = spec.process.unwrap_or_default();
        let mut vm =
            VmDefaults::from_process(&process.args, &process.env).map_err(|e| e.to_string())?;
        let resources = spec.linux.and_then(|l| l.resources).unwrap_or_default();
        if let Some(limit) = resources.memory.and_then(|m| m.limit).filter(|&l| l > 0) {
            vm.memory = Some(limit as u64);
        }
        if let Some(cpu) = resources.cpu {
            if let (Some(quota), Some(period)) =
                (cpu.quota.filter(|&q| q > 0), cpu.period.filter(|&p| p > 0))
            {
                let cpus = (quota as u64).div_ceil(period).clamp(1, u8::MAX as u64);
                vm.cpus = Some(cpus as u8);
            }
        }
        Ok(TaskSpec {
            sandbox: spec.annotations.get(CONTAINER_TYPE).map(String::as_str) == Some("sandbox"),
            vm,
        })
    }
}

/// The image's unpacked layers, bottom first, from the snapshotter's
/// mounts: overlayfs lists its lowerdirs top first; an image of one layer
/// may come as a bind mount of it.
pub fn layer_dirs(rootfs: &[Mount]) -> Result<Vec<PathBuf>, Error> {
    let [m] = rootfs else {
        return Err(Error::Bundle(format!(
            "{} rootfs mounts, where a VM image's snapshot is one",
            rootfs.len()
        )));
    };
    match m.type_.as_str() {
        "overlay" => {
            let lower = m
                .options
                .iter()
                .find_map(|o| o.strip_prefix("lowerdir="))
                .ok_or_else(|| Error::Bundle("the overlay mount has no lowerdir".into()))?;
            Ok(lower.split(':').rev().map(PathBuf::from).collect())
        }
        "bind" | "rbind" => Ok(vec![PathBuf::from(&m.source)]),
        other => Err(Error::Bundle(format!(
            "a rootfs mount of type {other:?} (the overlayfs or native snapshotter's are read)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_s_defaults_come_through_and_a_pod_s_limits_win() {
        let t = TaskSpec::parse(
            br#"{"process":{"args":["mode=read","size=8M"],"env":["PATH=/bin","VMCTL_CPUS=2","VMCTL_MEMORY=67108864"]},
                 "linux":{"resources":{"memory":{"limit":134217728},"cpu":{"quota":250000,"period":100000}}}}"#,
        )
        .unwrap();
        assert!(!t.sandbox);
        assert_eq!(t.vm.cmdline.as_deref(), Some("mode=read size=8M"));
        assert_eq!(t.vm.memory, Some(128 << 20));
        assert_eq!(t.vm.cpus, Some(3));
        let t =
            TaskSpec::parse(br#"{"annotations":{"io.kubernetes.cri.container-type":"sandbox"}}"#)
                .unwrap();
        assert!(t.sandbox);
        assert_eq!(t.vm, VmDefaults::default());
        let e = TaskSpec::parse(br#"{"process":{"env":["VMCTL_CPUS=many"]}}"#).unwrap_err();
        assert!(e.contains("VMCTL_CPUS"), "{e}");
    }

    #[test]
    fn overlay_lowerdirs_come_bottom_first() {
        let m = Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                "workdir=/w".into(),
                "upperdir=/u".into(),
                "lowerdir=/top:/mid:/bottom".into(),
            ],
            ..Default::default()
        };
        assert_eq!(
            layer_dirs(&[m]).unwrap(),
            vec![
                PathBuf::from("/bottom"),
                PathBuf::from("/mid"),
                PathBuf::from("/top")
            ]
        );
        assert!(layer_dirs(&[]).is_err());
    }
}
