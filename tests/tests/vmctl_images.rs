//! VM images through a registry, end to end: two state roots on this
//! machine play two hosts, one registry (Debian's docker-registry on
//! 127.0.0.1) between them. Host A pushes a base a guest wrote, host B
//! boots a VM from the reference (pulled on first use) whose guest reads
//! the data back verified; a clone written on host A is pushed and host
//! B fetches only the clone's layer, by the registry's own access log;
//! the store is listed, pruned only of what nothing uses, and bad
//! references are refused by name.

use serde_json::Value;
use test_infra::{ready, Fixture, LocalRegistry, Patience, Vmctl};

/// Starts VM `name` and waits for it: it must exit 0.
fn runs_ok(host: &Vmctl, name: &str) {
    host.ok(&["start", name]);
    host.assert_exits_ok(name);
}

fn digests_uploaded(report: &Value) -> Vec<String> {
    report["blobs"]
        .as_array()
        .expect("blobs")
        .iter()
        .filter(|b| b["transferred"] == true)
        .filter_map(|b| b["digest"].as_str().map(String::from))
        .collect()
}

#[test]
fn a_vm_image_travels_between_two_hosts_through_a_registry_layer_by_layer() {
    if !ready("vmctl_images", &["docker-registry"]) {
        return;
    }
    let fx = Fixture::new();
    let reg = LocalRegistry::start(&fx.path("")).expect("registry");
    let a = Vmctl::at(fx.path("host-a"));
    let b = Vmctl::at(fx.path("host-b"));
    let base = fx.golden_base().0;
    let base_ref = format!("{}/vms/base:golden", reg.address);
    let v2_ref = format!("{}/vms/base:v2", reg.address);

    // Host A pushes the base with its defaults.
    let pushed = a.json(&[
        "image",
        "push",
        base.to_str().unwrap(),
        &base_ref,
        "--cmdline",
        "mode=read verify=1 expect_gen=7 size=8M",
        "--memory",
        "64M",
    ]);
    let base_layer = pushed["blobs"][0]["digest"].as_str().unwrap().to_string();

    // Host B: a VM from the reference, pulled on first use, its guest
    // reading the base's data back with the image's command line.
    b.ok(&["create", "reader", "--image", &base_ref]);
    runs_ok(&b, "reader");
    let listed = b.json(&["image", "ls"]);
    assert_eq!(listed[0]["reference"], base_ref.as_str(), "{listed}");
    assert_eq!(listed[0]["vms"][0], "reader", "{listed}");

    // Host A: a VM on the base writes generation 9 over 4 MiB at 16 MiB;
    // its disk, sealed, is pushed: only its own layer (and a config) go.
    let clone = a.sealed_clone(
        "writer",
        base.to_str().unwrap(),
        "mode=write verify=1 gen=9 offset=16M size=4M",
        "v2",
    );
    let v2 = a.json(&["image", "push", &clone, &v2_ref, "--memory", "64M"]);
    let uploaded = digests_uploaded(&v2);
    assert_eq!(uploaded.len(), 2, "the clone's layer and its config: {v2}");
    assert!(!uploaded.contains(&base_layer), "{v2}");
    let clone_layer = v2["blobs"][1]["digest"].as_str().unwrap().to_string();
    let clone_bytes = v2["blobs"][1]["size"].as_u64().unwrap();
    assert!(
        (4 << 20..(4 << 20) + (1 << 20)).contains(&clone_bytes),
        "the clone's layer is its 4 MiB of data: {clone_bytes} bytes"
    );

    // Host B pulls v2, killed anywhere first: whatever each kill left,
    // the next pull finishes, and the layers fetched whole stay fetched.
    // (A pull of the 4 MiB layer takes about 40 ms here.)
    let whole = std::time::Instant::now();
    let c = Vmctl::at(fx.path("host-c"));
    c.ok(&["image", "pull", &v2_ref]);
    let whole = whole.elapsed();
    for k in 0..8u32 {
        let at = whole * k / 6;
        let b2 = Vmctl::at(fx.path(&format!("host-k{k}")));
        let finished = b2.killed_after(&["image", "pull", &v2_ref], at);
        let again = b2.json(&["image", "pull", &v2_ref]);
        assert_eq!(
            again["record"]["layers"].as_array().map(Vec::len),
            Some(2),
            "kill {k} at {at:?} (finished: {finished}): {again}"
        );
        let tmp: Vec<_> = std::fs::read_dir(b2.state.join("images/tmp"))
            .unwrap()
            .collect();
        assert!(tmp.is_empty(), "kill {k}: work files left: {tmp:?}");
        let hidden = std::fs::read_dir(b2.state.join("images/layers"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with("-tmp"))
            .count();
        assert_eq!(hidden, 0, "kill {k}: a half-made layer left");
    }

    // Host B pulls v2: the registry serves the clone's layer alone.
    let before = reg.blobs_fetched().len();
    let pulled = b.json(&["image", "pull", &v2_ref]);
    let layers: Vec<String> = reg.blobs_fetched()[before..]
        .iter()
        .filter(|d| **d == base_layer || **d == clone_layer)
        .cloned()
        .collect();
    assert_eq!(layers, std::slice::from_ref(&clone_layer), "{pulled}");
    // Its guest reads both generations back.
    b.ok(&[
        "create",
        "both",
        "--image",
        &v2_ref,
        "--cmdline",
        "mode=read verify=1 expect_gen=9 offset=16M size=4M",
    ]);
    runs_ok(&b, "both");
    b.ok(&[
        "create",
        "old",
        "--image",
        &v2_ref,
        "--cmdline",
        "mode=read verify=1 expect_gen=7 size=8M",
    ]);
    runs_ok(&b, "old");
    // A fleet from the reference.
    let fleet = b.json(&[
        "run",
        "--count",
        "2",
        "--image",
        &v2_ref,
        "--cmdline",
        "mode=read verify=1 expect_gen=9 offset=16M size=4M",
        "--rm",
    ]);
    assert_eq!(fleet["failed"], 0, "{fleet}");

    // The store: a forgotten image's layers stay while a VM stands on
    // them; once nothing does, prune frees them.
    b.ok(&["image", "rm", &base_ref]);
    let e = b.fails(&["image", "rm", &base_ref]);
    assert!(e.contains("no image"), "{e}");
    b.ok(&["image", "prune"]);
    runs_ok(&b, "reader");
    b.ok(&["delete", "reader", "both", "old"]);
    b.ok(&["image", "rm", &v2_ref]);
    let pruned = b.ok(&["image", "prune"]);
    assert!(pruned.starts_with("pruned 2 "), "{pruned}");
    let left = std::fs::read_dir(b.state.join("images/layers"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .map(|e| e.path().extension().is_some_and(|x| x == "img"))
                .unwrap_or(false)
        })
        .count();
    assert_eq!(left, 0);

    // Bad references: refused by name, nothing defined.
    let e = b.fails(&[
        "create",
        "bad",
        "--image",
        &format!("{}/vms/nosuch:1", reg.address),
    ]);
    assert!(e.contains("pulling") && e.contains("nosuch"), "{e}");
    assert!(!b.state.join("vms/bad").exists());
    let e = b.fails(&["image", "pull", "UPPER/Case"]);
    assert!(e.contains("is not an image reference"), "{e}");
    let e = b.fails(&[
        "image",
        "push",
        base.to_str().unwrap().trim_end_matches("@golden"),
        &base_ref,
    ]);
    assert!(e.contains("not sealed"), "{e}");
}

/// Bytes of the blobs of `report` (a push's or a pull's JSON) that
/// crossed.
fn transferred(report: &Value) -> u64 {
    report["blobs"]
        .as_array()
        .expect("blobs")
        .iter()
        .filter(|b| b["transferred"] == true)
        .map(|b| b["size"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn a_vm_snapshot_travels_through_a_registry_and_vms_on_another_host_continue_from_it() {
    if !ready("vmctl_images_snapshot", &["docker-registry"]) {
        return;
    }
    let fx = Fixture::new();
    let reg = LocalRegistry::start(&fx.path("")).expect("registry");
    let a = Vmctl::at(fx.path("host-a"));
    let b = Vmctl::at(fx.path("host-b"));
    let base = fx.golden_base().0;
    let snap_ref = format!("{}/vms/writer:s1", reg.address);

    // Host A: a verifying writer, snapshotted mid-run (after its first
    // progress line), pushed with its memory and state.
    a.ok(&[
        "create",
        "src",
        "--image",
        base.to_str().unwrap(),
        "--cmdline",
        "mode=randwrite verify=1 gen=5 offset=16M size=8M duration_ms=3000 progress_ms=200 timeout_ms=60000",
    ]);
    a.ok(&["start", "src"]);
    Patience::new("a progress line", std::time::Duration::from_millis(500))
        .wait_until(|| Ok(a.ok(&["logs", "src"]).contains("progress:")))
        .unwrap_or_else(|e| panic!("{e}"));
    a.ok(&["snapshot", "src", "s1"]);
    let pushed = a.json(&["image", "push", "s1", &snap_ref, "--vm-snapshot"]);
    // Its memory travels as the pages the guest touched: far less than
    // its 256 MiB.
    let sent = transferred(&pushed);
    assert!(sent > 0 && sent < 64 << 20, "{pushed}");
    // The same snapshot again: the same blobs, nothing uploaded.
    let again = a.json(&["image", "push", "s1", &snap_ref, "--vm-snapshot"]);
    assert_eq!(transferred(&again), 0, "{again}");
    a.ok(&["wait", "src"]);

    // Host B: two VMs continue from the snapshot's instant, each on its
    // own clone, and finish the run verified.
    let report = b.json(&[
        "run",
        "--count",
        "2",
        "--name",
        "copy",
        "--from-snapshot",
        &snap_ref,
        "--rm",
    ]);
    assert_eq!(report["failed"], 0, "{report}");
    for r in report["vms"].as_array().expect("rows") {
        assert_eq!(r["result"]["result"], "ok", "{r}");
        assert_eq!(r["result"]["verify_failures"], 0, "{r}");
    }
    // A VM keeps what it continues from: the reference forgotten and the
    // store pruned, it still starts; once it is gone, prune frees it.
    b.ok(&[
        "create",
        "solo",
        "--from-snapshot",
        &snap_ref,
        "--restore-memory",
        "lazy",
    ]);
    b.ok(&["image", "rm", &snap_ref]);
    b.ok(&["image", "prune"]);
    b.ok(&["start", "solo"]);
    b.assert_exits_ok("solo");
    b.ok(&["delete", "solo"]);
    b.ok(&["image", "prune"]);
    let states = std::fs::read_dir(fx.path("host-b/images/states"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(states, 0, "the state pruned with its last VM");

    // A disk image is no VM snapshot: refused by name.
    let disk_ref = format!("{}/vms/base:golden", reg.address);
    a.ok(&["image", "push", base.to_str().unwrap(), &disk_ref]);
    let e = b.fails(&["create", "x", "--from-snapshot", &disk_ref]);
    assert!(e.contains("is a disk image, not a VM snapshot"), "{e}");
}
