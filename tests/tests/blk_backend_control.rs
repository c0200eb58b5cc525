//! blk-backend's control socket (JSON lines, like QMP): exports added,
//! listed with their sessions and counters, and removed at runtime, under
//! the process's seccomp filters; bad commands get an error and the
//! connection goes on.

use std::time::Duration;

use serde_json::{json, Value};
use test_infra::{bin, img, ready, s, BackendControl, BlkBackendProcess, Fixture, VmmVm};

type Control = BackendControl;

/// The reply is a refusal of `class` whose description says `says`.
fn assert_refused(r: &Value, class: &str, says: &str) {
    assert_eq!(r["error"]["class"], class, "{r}");
    assert!(
        r["error"]["desc"].as_str().unwrap_or("").contains(says),
        "{r}"
    );
}

#[test]
fn exports_are_added_listed_and_removed_at_runtime() {
    if !ready("blk_backend_control", &[]) {
        return;
    }
    let fx = Fixture::new();
    let image = fx.image("vm.img", "64M");
    let sock = Fixture::socket_of(&image);
    let ctl_path = fx.path("control.sock");
    let backend = BlkBackendProcess::start_exports_with(
        &bin("blk-backend"),
        &[],
        &["--control", &s(&ctl_path)],
    )
    .expect("blk-backend starts with no export");
    // A client that connects and never says anything (one once held the
    // socket for everyone: clients were served one at a time) ...
    let silent = Control::connect(&ctl_path);
    // ... does not keep this one waiting (a hang here ends in the timeout,
    // far above a reply's milliseconds).
    let mut ctl = Control::connect(&ctl_path);
    ctl.set_timeout(Some(Duration::from_secs(60)));

    let r =
        ctl.call(json!({"execute": "export-add", "arguments": {"socket": sock, "image": image}}));
    assert_eq!(r, json!({"return": {}}));
    VmmVm::new(
        &bin("vmm"),
        "mode=randwrite verify=1 gen=2 size=8M ios=2000",
    )
    .with_disk(&sock, 1)
    .run()
    .expect("the vmm runs")
    .assert_ok("a workload on an export added at runtime");
    let list = ctl.call(json!({"execute": "export-list"}));
    let e = &list["return"][0];
    assert_eq!(e["socket"], json!(sock), "{list}");
    assert_eq!(e["counters"]["sessions"], 1, "{list}");
    assert!(
        e["counters"]["requests"].as_u64().unwrap_or(0) >= 2000,
        "{list}"
    );
    assert_eq!(e["counters"]["failed-requests"], 0, "{list}");

    // Refusals, each by name; the connection goes on.
    let r =
        ctl.call(json!({"execute": "export-add", "arguments": {"socket": sock, "image": image}}));
    assert_refused(&r, "ExportExists", "already listens");
    let missing = fx.path("missing.img");
    let other = fx.path("other.sock");
    let r = ctl
        .call(json!({"execute": "export-add", "arguments": {"socket": other, "image": missing}}));
    assert_refused(&r, "GenericError", "missing.img");
    assert!(!other.exists(), "a failed add left its socket");
    // Relative paths would resolve against the backend's directory, not
    // the client's (and once killed the process in its sandbox): refused
    // by name, and the same connection goes on serving.
    for args in [
        json!({"socket": "rel.sock", "image": image}),
        json!({"socket": other, "image": "state/vm.img"}),
    ] {
        let r = ctl.call(json!({"execute": "export-add", "arguments": args}));
        assert_refused(&r, "GenericError", "is a relative path");
    }
    let r = ctl.call(json!({"execute": "export-del", "arguments": {"socket": "rel.sock"}}));
    assert_refused(&r, "GenericError", "is a relative path");
    assert_eq!(ctl.raw("{not json")["error"]["class"], "GenericError");
    assert_eq!(
        ctl.call(json!({"execute": "quit-now"}))["error"]["class"],
        "CommandNotFound"
    );
    let r = ctl.call(json!({"execute": "export-del", "arguments": {"socket": other}}));
    assert_refused(&r, "DeviceNotFound", "no export on");

    // Removed: its socket is gone and its image closed (an operation that
    // needs it exclusively succeeds).
    assert_eq!(
        ctl.call(json!({"execute": "export-del", "arguments": {"socket": sock}})),
        json!({"return": {}})
    );
    assert!(!sock.exists());
    assert_eq!(
        ctl.call(json!({"execute": "export-list"})),
        json!({"return": []})
    );
    img(&["snapshot", "-c", "after", &s(&image)]);

    // Many VMs on the one process at once: sessions and workers starting
    // together under the filters (glibc's malloc once read /sys from a new
    // thread there, a call the workers' filter does not allow).
    let vms: Vec<_> = (0..6)
        .map(|k| {
            let disk = fx.image(&format!("many{k}.img"), "16M");
            let sock = Fixture::socket_of(&disk);
            let r = ctl.call(
                json!({"execute": "export-add", "arguments": {"socket": sock, "image": disk}}),
            );
            assert_eq!(r, json!({"return": {}}));
            VmmVm::new(&bin("vmm"), "mode=randread ios=200 qd=4")
                .with_disk(&sock, 1)
                .spawn()
                .expect("a vmm starts")
        })
        .collect();
    for vm in vms {
        vm.wait()
            .expect("the vmm ends")
            .assert_ok("one of many VMs on one backend");
    }
    let list = ctl.call(json!({"execute": "export-list"}));
    assert_eq!(list["return"].as_array().map(Vec::len), Some(6), "{list}");

    // Clients are served in parallel: four adding one socket at once get
    // one success and three refusals by class (never a failure on the
    // image's lock or on the socket another add just bound).
    let disk = fx.image("raced.img", "16M");
    let sock = Fixture::socket_of(&disk);
    let replies: Vec<Value> = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    Control::connect(&ctl_path).call(json!({"execute": "export-add",
                        "arguments": {"socket": sock, "image": disk}}))
                })
            })
            .collect();
        racers
            .into_iter()
            .map(|r| r.join().expect("a racer"))
            .collect()
    });
    let ok = replies
        .iter()
        .filter(|r| **r == json!({"return": {}}))
        .count();
    let refused = replies
        .iter()
        .filter(|r| r["error"]["class"] == "ExportExists")
        .count();
    assert_eq!((ok, refused), (1, 3), "{replies:?}");
    // The silent client was connected all along, and is answered too.
    let mut silent = silent;
    let list = silent.call(json!({"execute": "export-list"}));
    assert_eq!(list["return"].as_array().map(Vec::len), Some(7), "{list}");
    drop(ctl);
    backend.stop();
}
