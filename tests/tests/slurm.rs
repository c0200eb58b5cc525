//! Batch fleets of VMs on Slurm, end to end: Debian's slurm-wlm and munge
//! of the test's own (one node), the recipe vmctl/slurm/vm-fleet.sbatch
//! submitted as an array: each task pulls the registry image on first use
//! (the node's store fetches its layer once for all tasks), runs its VMs
//! and leaves its results; a guest's failure is the task's exit code; a
//! scancel'd job's VMs are ended and deleted.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use test_infra::slurm::TaskState;
use test_infra::{bin, ready, repo_root, s, Fixture, LocalRegistry, LocalSlurm, Patience, Vmctl};

fn results(dir: &Path, task: u32) -> Value {
    let f = dir.join(format!("{task}.json"));
    serde_json::from_str(&std::fs::read_to_string(&f).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
}

fn submit(
    slurm: &LocalSlurm,
    fx: &Fixture,
    array: &str,
    reference: &str,
    out: &Path,
    extra: &[&str],
) -> u32 {
    let script = repo_root().join("vmctl/slurm/vm-fleet.sbatch");
    let log = fx.path("slurm-%A-%a.log");
    let mut args = vec![
        "--array".to_string(),
        array.to_string(),
        "--output".into(),
        s(&log),
        s(&script),
        reference.into(),
        "2".into(),
        s(out),
    ];
    args.extend(extra.iter().map(|e| e.to_string()));
    slurm.sbatch(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn states(tasks: &[TaskState]) -> Vec<(u32, String, i32)> {
    let mut v: Vec<_> = tasks
        .iter()
        .map(|t| (t.task.unwrap_or(u32::MAX), t.state.clone(), t.exit.0))
        .collect();
    v.sort();
    v
}

#[test]
fn a_slurm_array_runs_vm_fleets_from_a_registry_image() {
    if !ready(
        "slurm",
        &["slurmctld", "slurmd", "munged", "sbatch", "docker-registry"],
    ) {
        return;
    }
    let fx = Fixture::new();
    let reg = LocalRegistry::start(&fx.path("")).expect("registry");
    let (base, _) = fx.golden_base();
    let reference = format!("{}/vms/base:golden", reg.address);
    let pushed = Vmctl::at(fx.path("builder")).json(&[
        "image",
        "push",
        base.to_str().unwrap(),
        &reference,
        "--cmdline",
        "mode=read verify=1 expect_gen=7 size=8M",
        "--memory",
        "64M",
    ]);
    let layer = pushed["blobs"][0]["digest"].as_str().unwrap().to_string();
    let node = fx.path("node");
    let vmctl = bin("vmctl");
    let slurm = LocalSlurm::start(
        &fx.path("slurm"),
        &[("VMCTL", &s(&vmctl)), ("VMCTL_STATE_DIR", &s(&node))],
    )
    .expect("a Slurm cluster");
    let host = Vmctl::at(node.clone());
    // A task runs two VMs of well under a second each; the queue, three.
    let job_time = Duration::from_secs(5);

    // Three tasks, two VMs each, reading the base back: all complete, 0.
    let ok = fx.path("ok");
    let job = submit(&slurm, &fx, "0-2", &reference, &ok, &[]);
    let done = slurm.wait_job(job, job_time);
    assert_eq!(
        states(&done),
        vec![
            (0, "COMPLETED".into(), 0),
            (1, "COMPLETED".into(), 0),
            (2, "COMPLETED".into(), 0)
        ]
    );
    for task in 0..3 {
        let r = results(&ok, task);
        assert_eq!(r["failed"], 0, "{r}");
        assert_eq!(r["vms"].as_array().map(Vec::len), Some(2), "{r}");
    }
    // The node's store fetched the layer once, for every task.
    let fetched = reg.blobs_fetched().iter().filter(|d| **d == layer).count();
    assert_eq!(fetched, 1, "{:?}", reg.blobs_fetched());
    assert!(host.json(&["list"]).as_array().unwrap().is_empty(), "--rm");

    // Guests that find other data: each task fails with vmctl run's 1.
    let bad = fx.path("bad");
    let job = submit(
        &slurm,
        &fx,
        "0-1",
        &reference,
        &bad,
        &["--cmdline", "mode=read verify=1 expect_gen=9 size=8M"],
    );
    let done = slurm.wait_job(job, job_time);
    assert_eq!(
        states(&done),
        vec![(0, "FAILED".into(), 1), (1, "FAILED".into(), 1)]
    );
    assert_eq!(results(&bad, 0)["failed"], 2);

    // VMs that run on, cancelled: the job ends CANCELLED and its VMs are
    // ended and deleted (vmctl run --rm on SIGTERM).
    let idle = fx.path("idle");
    let job = submit(
        &slurm,
        &fx,
        "0-1",
        &reference,
        &idle,
        &["--cmdline", "mode=idle"],
    );
    Patience::new("the cancelled job's VMs running", job_time)
        .wait_until(|| {
            let vms = host.json(&["list"]);
            Ok(vms
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["state"] == "running")
                .count()
                == 4)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let out = slurm.command("scancel", &[&job.to_string()], Duration::from_secs(1));
    assert!(out.status.success(), "{out:?}");
    let done = slurm.wait_job(job, job_time);
    assert!(done.iter().all(|t| t.state == "CANCELLED"), "{done:?}");
    Patience::new("the cancelled job's VMs deleted", job_time)
        .wait_until(|| Ok(host.json(&["list"]).as_array().unwrap().is_empty()))
        .unwrap_or_else(|e| panic!("{e}"));
}
