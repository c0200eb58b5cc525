//! containerd runs vmctl VMs through containerd-shim-vmctl-v1, end to
//! end: Debian's containerd 1.6 of the test's own, a VM image pushed by
//! vmctl to a registry on 127.0.0.1 and pulled by `ctr image pull` like
//! any container image; `ctr run --runtime io.containerd.vmctl.v1` boots
//! the VM, prints its console and returns the guest's exit status; a
//! detached VM is listed, paused, resumed, measured, stopped gracefully
//! or killed (also SIGKILL cutting a graceful stop short); a shim that
//! dies is cleaned up after by containerd's `delete`; a clone's image
//! pushed after its base costs containerd only the clone's layer (the
//! registry's access log) and vmctl's store only its restore; an image
//! that is not a VM image is refused by name.

use std::time::Duration;

use test_infra::containerd::RUNTIME;
use test_infra::{ready, Fixture, LocalContainerd, LocalRegistry, Patience, Vmctl, START_MARKER};

/// What containerd's calls cost here: well under a second each (a VM's
/// boot included); the margin is Patience's.
const CALL: Duration = Duration::from_secs(2);

fn until(what: &str, mut f: impl FnMut() -> bool) {
    Patience::new(what, Duration::from_secs(1))
        .wait_until(|| Ok(f()))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The task's row in `ctr task ls`: (pid, status).
fn task_row(c: &LocalContainerd, id: &str) -> Option<(u32, String)> {
    c.ctr_ok(&["task", "ls"]).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id)).then(|| (f[1].parse().unwrap_or(0), f[2].to_string()))
    })
}

/// `ctr run -d` of an idle VM named `id`.
fn run_idle(c: &LocalContainerd, reference: &str, id: &str) {
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        reference,
        id,
        "mode=idle",
    ]);
}

/// Once task `id` has stopped: its task deleted (ctr's answer) and its
/// container removed.
fn remove_stopped(c: &LocalContainerd, id: &str) -> std::process::Output {
    until(&format!("task {id} stopped"), || {
        task_row(c, id).is_some_and(|r| r.1 == "STOPPED")
    });
    let out = c.ctr(&["task", "delete", id], CALL);
    c.ctr_ok(&["container", "rm", id]);
    out
}

/// The sealed layers in vmctl's store at `state` (beside them,
/// image-format's notes of the clones that stood on them).
fn store_layers(state: &std::path::Path) -> usize {
    std::fs::read_dir(state.join("images/layers"))
        .expect("the store")
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count()
}

fn vm_names(host: &Vmctl) -> Vec<String> {
    host.json(&["list"])
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect()
}

#[test]
fn ctr_runs_a_vm_image_from_a_registry_through_the_vmctl_shim() {
    if !ready(
        "containerd",
        &["containerd", "ctr", "docker-registry", "umoci", "skopeo"],
    ) {
        return;
    }
    let fx = Fixture::new();
    let reg = LocalRegistry::start(&fx.path("")).expect("registry");
    let (base, _) = fx.golden_base();
    let builder = Vmctl::at(fx.path("builder"));
    let reference = format!("{}/vms/base:golden", reg.address);
    builder.ok(&[
        "image",
        "push",
        base.to_str().unwrap(),
        &reference,
        "--cmdline",
        "mode=read verify=1 expect_gen=7 size=8M",
        "--memory",
        "64M",
    ]);
    let host = Vmctl::at(fx.path("node"));
    let c =
        LocalContainerd::start(&fx.path("containerd"), &fx.path("node"), None).expect("containerd");
    c.ctr_ok(&["image", "pull", "--plain-http", &reference]);

    // The image's command line reads the base's data back: exit 0, the
    // console on ctr's stdout.
    let out = c.ctr(&["run", "--runtime", RUNTIME, &reference, "reader"], CALL);
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && console.contains(START_MARKER)
            && console.contains("\"result\":\"ok\""),
        "{out:?}"
    );
    // Arguments are the guest's command line: a guest that finds other
    // data fails, and its status (1) is ctr's.
    let out = c.ctr(
        &[
            "run",
            "--runtime",
            RUNTIME,
            &reference,
            "wrong",
            "mode=read",
            "verify=1",
            "expect_gen=9",
            "size=8M",
        ],
        CALL,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // The image's layer came into vmctl's store once, for both VMs; a
    // task's VM goes with its task.
    let layers = store_layers(&fx.path("node"));
    assert_eq!(layers, 1, "one layer in the store");
    assert!(vm_names(&host).is_empty(), "{:?}", vm_names(&host));

    // A detached VM: listed with the vmm's pid, paused and resumed,
    // measured, then stopped gracefully (SIGTERM): the guest's exit 0.
    run_idle(&c, &reference, "idle");
    let vm = vm_names(&host).pop().expect("the task's VM");
    let (pid, status) = task_row(&c, "idle").expect("listed");
    assert_eq!(status, "RUNNING");
    assert_eq!(host.info(&vm)["pid"], pid, "the task's pid is the vmm's");
    c.ctr_ok(&["task", "pause", "idle"]);
    assert_eq!(task_row(&c, "idle").unwrap().1, "PAUSED");
    assert_eq!(host.info(&vm)["state"], "paused");
    c.ctr_ok(&["task", "resume", "idle"]);
    assert_eq!(host.info(&vm)["state"], "running");
    let metrics = c.ctr_ok(&["task", "metrics", "idle"]);
    let rss: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("memory.usage "))
        .and_then(|v| v.trim().parse().ok())
        .expect("memory.usage");
    assert!(rss > 1 << 20, "{metrics}");
    c.ctr_ok(&["task", "kill", "idle"]);
    let out = remove_stopped(&c, "idle");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "status 0: {out:?}"
    );
    assert!(vm_names(&host).is_empty());

    // SIGKILL ends it at once: 137, as for a killed container.
    run_idle(&c, &reference, "killed");
    c.ctr_ok(&["task", "kill", "--signal", "SIGKILL", "killed"]);
    // (ctr's task delete warns of a status that is not 0.)
    let out = remove_stopped(&c, "killed");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("exit code 137"),
        "{out:?}"
    );

    // A shim that dies: containerd runs its `delete`, which removes the VM.
    run_idle(&c, &reference, "orphan");
    let shims = c.shims();
    assert_eq!(shims.len(), 1, "{shims:?}");
    // SAFETY: kill(2) on the shim found above.
    unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) };
    until("containerd cleaned up after the dead shim", || {
        vm_names(&host).is_empty()
    });
    let _ = c.ctr(&["task", "delete", "orphan"], CALL);
    c.ctr_ok(&["container", "rm", "orphan"]);

    // SIGTERM then SIGKILL at once (a grace cut short): stopped either
    // way, neither call refused.
    run_idle(&c, &reference, "cut");
    c.ctr_ok(&["task", "kill", "cut"]);
    c.ctr_ok(&["task", "kill", "--signal", "SIGKILL", "cut"]);
    remove_stopped(&c, "cut");
    assert!(vm_names(&host).is_empty());

    // The builder's clone, written by a guest, pushed as v2: containerd
    // fetches only its new layer (the registry's own log says so), and the
    // shim restores only that layer into the store, on the base it has.
    let clone = builder.sealed_clone(
        "writer",
        base.to_str().unwrap(),
        "mode=write verify=1 gen=9 offset=16M size=4M",
        "v2",
    );
    let v2_ref = format!("{}/vms/base:v2", reg.address);
    let v2 = builder.json(&[
        "image",
        "push",
        &clone,
        &v2_ref,
        "--memory",
        "64M",
        "--cmdline",
        "mode=read verify=1 expect_gen=9 offset=16M size=4M",
    ]);
    let layer_digests: Vec<String> = v2["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| !b["uuid"].is_null())
        .map(|b| b["digest"].as_str().unwrap().to_string())
        .collect();
    let before = reg.blobs_fetched().len();
    c.ctr_ok(&["image", "pull", "--plain-http", &v2_ref]);
    let fetched: Vec<String> = reg.blobs_fetched()[before..]
        .iter()
        .filter(|d| layer_digests.contains(d))
        .cloned()
        .collect();
    assert_eq!(
        fetched,
        vec![layer_digests[1].clone()],
        "only the clone's layer"
    );
    let out = c.ctr(
        &["run", "--rm", "--runtime", RUNTIME, &v2_ref, "v2-reader"],
        CALL,
    );
    assert!(out.status.success(), "{out:?}");
    let layers = store_layers(&fx.path("node"));
    assert_eq!(layers, 2, "the base once, and the clone's layer on it");

    // An ordinary container image is no VM: refused by name, nothing left.
    let plain = reg
        .push_container_image(&fx.path(""), "plain/pause:1")
        .expect("a container image");
    c.ctr_ok(&["image", "pull", "--plain-http", &plain]);
    let out = c.ctr(&["run", "--runtime", RUNTIME, &plain, "plain"], CALL);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("not a VM image"),
        "{said}"
    );
    assert!(vm_names(&host).is_empty());
    // The shims are gone with their tasks.
    until("no shim left", || c.shims().is_empty());
}
