//! blk-backend's control socket (JSON lines, like QMP): exports added,
//! listed with their sessions and counters, and removed at runtime, under
//! the process's seccomp filters; bad commands get an error and the
//! connection goes on.

use std::path::Path;
use std::time::Duration;

use blk_control::{ClientError, ErrorClass, ExportArgs};
use test_infra::{bin, img, ready, s, BackendControl, BlkBackendProcess, Fixture, VmmVm};

type Control = BackendControl;

/// The command was refused as `class`, its description saying `says`.
fn assert_refused<T: std::fmt::Debug>(r: Result<T, ClientError>, class: ErrorClass, says: &str) {
    let e = r.expect_err("a refusal");
    let refusal = e.refusal().unwrap_or_else(|| panic!("not a refusal: {e}"));
    assert_eq!(refusal.class, class, "{e}");
    assert!(refusal.desc.contains(says), "{e}");
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

    ctl.add(ExportArgs::new(&sock, &image)).expect("export-add");
    VmmVm::new(
        &bin("vmm"),
        "mode=randwrite verify=1 gen=2 size=8M ios=2000",
    )
    .with_disk(&sock, 1)
    .run()
    .expect("the vmm runs")
    .assert_ok("a workload on an export added at runtime");
    let list = ctl.list().expect("export-list");
    let e = &list[0];
    assert_eq!(e.socket, sock, "{list:?}");
    assert_eq!(e.counters.sessions, 1, "{list:?}");
    assert!(e.counters.requests >= 2000, "{list:?}");
    assert_eq!(e.counters.failed_requests, 0, "{list:?}");

    // Refusals, each by name; the connection goes on.
    assert_refused(
        ctl.add(ExportArgs::new(&sock, &image)),
        ErrorClass::ExportExists,
        "already listens",
    );
    let missing = fx.path("missing.img");
    let other = fx.path("other.sock");
    assert_refused(
        ctl.add(ExportArgs::new(&other, &missing)),
        ErrorClass::GenericError,
        "missing.img",
    );
    assert!(!other.exists(), "a failed add left its socket");
    // Relative paths would resolve against the backend's directory, not
    // the client's (and once killed the process in its sandbox): refused
    // by name, and the same connection goes on serving.
    for args in [
        ExportArgs::new("rel.sock", &image),
        ExportArgs::new(&other, "state/vm.img"),
    ] {
        assert_refused(
            ctl.add(args),
            ErrorClass::GenericError,
            "is a relative path",
        );
    }
    assert_refused(
        ctl.del(Path::new("rel.sock")),
        ErrorClass::GenericError,
        "is a relative path",
    );
    assert_eq!(ctl.raw("{not json")["error"]["class"], "GenericError");
    assert_eq!(
        ctl.raw(r#"{"execute": "quit-now"}"#)["error"]["class"],
        "CommandNotFound"
    );
    assert_refused(ctl.del(&other), ErrorClass::DeviceNotFound, "no export on");

    // Removed: its socket is gone and its image closed (an operation that
    // needs it exclusively succeeds).
    ctl.del(&sock).expect("export-del");
    assert!(!sock.exists());
    assert_eq!(ctl.list().expect("export-list"), []);
    img(&["snapshot", "-c", "after", &s(&image)]);

    // Many VMs on the one process at once: sessions and workers starting
    // together under the filters (glibc's malloc once read /sys from a new
    // thread there, a call the workers' filter does not allow).
    let vms: Vec<_> = (0..6)
        .map(|k| {
            let disk = fx.image(&format!("many{k}.img"), "16M");
            let sock = Fixture::socket_of(&disk);
            ctl.add(ExportArgs::new(&sock, &disk)).expect("export-add");
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
    let list = ctl.list().expect("export-list");
    assert_eq!(list.len(), 6, "{list:?}");

    // Clients are served in parallel: four adding one socket at once get
    // one success and three refusals by class (never a failure on the
    // image's lock or on the socket another add just bound).
    let disk = fx.image("raced.img", "16M");
    let sock = Fixture::socket_of(&disk);
    let replies: Vec<Result<(), ClientError>> = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| Control::connect(&ctl_path).add(ExportArgs::new(&sock, &disk))))
            .collect();
        racers
            .into_iter()
            .map(|r| r.join().expect("a racer"))
            .collect()
    });
    let ok = replies.iter().filter(|r| r.is_ok()).count();
    let refused = replies
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|e| e.is_refused(ErrorClass::ExportExists))
        })
        .count();
    assert_eq!((ok, refused), (1, 3), "{replies:?}");
    // The silent client was connected all along, and is answered too.
    let mut silent = silent;
    let list = silent.list().expect("export-list");
    assert_eq!(list.len(), 7, "{list:?}");
    drop(ctl);
    backend.stop();
}
