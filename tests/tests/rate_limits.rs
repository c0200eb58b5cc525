//! blk-backend's rate limits, end to end through real guests: a guest
//! that asks for more I/O than its export allows gets the limit, by its
//! own report (its progress lines: milliseconds and I/Os so far, from its
//! own clock); a limit changed live through the control socket takes
//! effect within a second; a bandwidth limit holds bytes; a group shared
//! by two exports holds their sum; bad values and a group that does not
//! exist are refused by name with nothing changed.
//!
//! The limits are a small fraction of what this machine's guests reach
//! unlimited (tens of thousands of I/Os a second), so a slower machine
//! still saturates them: the figures do not depend on its speed.

use std::path::Path;
use std::time::Duration;

use blk_control::{ClientError, ExportArgs};
use rate_limit::{BucketSpec, Limits};
use test_infra::{
    bin, ready, s, BackendControl, BlkBackendProcess, Fixture, Patience, RunningVm, Vmctl, VmmVm,
};

/// `(ms, I/Os)` of each progress line so far.
fn progress(console: &str) -> Vec<(u64, u64)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.split("progress: ").nth(1)?;
            let mut w = rest.split_whitespace();
            let ms = w.next()?.parse().ok()?;
            let ios = w.nth(1)?.parse().ok()?;
            Some((ms, ios))
        })
        .collect()
}

/// Where the guest's I/O settled at its limit: the first progress line
/// after which 100 ms went by at no more than `above` a second (before,
/// the bucket's first budget went at the guest's own speed, which on a
/// busy machine can take a while).
fn settled(console: &str, above: u64) -> Option<u64> {
    progress(console)
        .windows(2)
        .find(|w| (w[1].1 - w[0].1) * 1000 <= above * (w[1].0 - w[0].0))
        .map(|w| w[0].0)
}

/// I/Os per second between the first progress line at or after `from_ms`
/// and the last one.
fn rate(console: &str, from_ms: u64) -> f64 {
    let p = progress(console);
    let first = p
        .iter()
        .find(|(ms, _)| *ms >= from_ms)
        .expect("a line in the window");
    let last = p.last().expect("lines");
    assert!(
        last.0 >= first.0 + 500,
        "a window of at least 500 ms: {p:?}"
    );
    (last.1 - first.1) as f64 * 1000.0 / (last.0 - first.0) as f64
}

/// `n` a second from a bucket of a quarter of a second: what a full bucket
/// lets through at once (at the start) stays small beside a measurement's
/// two seconds, and a guest a busy host stalls for less than that loses
/// none of its budget.
fn quarters(n: u64) -> BucketSpec {
    BucketSpec {
        size: n / 4,
        one_time_burst: 0,
        refill_ms: 250,
    }
}

fn ops(n: u64) -> Limits {
    Limits {
        ops: Some(quarters(n)),
        bytes: None,
    }
}

fn within(got: f64, want: f64, tolerance: f64, what: &str) {
    assert!(
        (got - want).abs() <= want * tolerance,
        "{what}: {got:.1}/s, the limit {want}/s (within {:.0} %)",
        tolerance * 100.0
    );
}

/// A guest reading at random for `ms` milliseconds, a progress line every
/// 100 ms.
fn reader(sock: &Path, ms: u64, extra: &str) -> RunningVm {
    VmmVm::new(
        &bin("vmm"),
        &format!("mode=randread qd=4 duration_ms={ms} progress_ms=100 size=16M {extra}"),
    )
    .with_disk(sock, 1)
    .spawn()
    .expect("the vmm starts")
}

fn refused(r: Result<(), ClientError>, says: &str) {
    let e = r.expect_err("a refusal");
    assert!(e.to_string().contains(says), "{e}");
}

/// Requests answered and requests held back, of the exports on `socks`
/// together.
fn counters(ctl: &mut BackendControl, socks: &[&Path]) -> (u64, u64) {
    ctl.list()
        .expect("export-list")
        .iter()
        .filter(|e| socks.contains(&e.socket.as_path()))
        .fold((0, 0), |(r, t), e| {
            (r + e.counters.requests, t + e.counters.throttled)
        })
}

/// What the backend let through for `socks` over `secs` of host time: the
/// limiter's own clock (requests a second), and the share of them that
/// had to wait (near 1 when the limit, not the guests, set the pace).
///
/// It starts when a request has just waited: the budget is spent then, so
/// the window gets the limit's own rate and nothing a full bucket held
/// (a guest slow to start on a busy host leaves its first budget unspent
/// for a while).
fn measured(ctl: &mut BackendControl, socks: &[&Path], secs: f64) -> (f64, f64) {
    let (_, waited) = counters(ctl, socks);
    Patience::new("a request held back by the limit", Duration::from_secs(1))
        .wait_until(|| Ok(counters(ctl, socks).1 > waited))
        .expect("the guests reach their limit");
    let (r0, t0) = counters(ctl, socks);
    let start = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (r1, t1) = counters(ctl, socks);
    let dt = start.elapsed().as_secs_f64();
    let requests = (r1 - r0).max(1);
    (requests as f64 / dt, (t1 - t0) as f64 / requests as f64)
}

/// Never above the limit; at it whenever the limit set the pace (most
/// requests waited). A guest a busy host starves below its limit is the
/// host's doing, not the limiter's: then only the bound is checked.
fn at_limit((got, waited): (f64, f64), limit: f64, what: &str) {
    assert!(
        got <= limit * 1.1,
        "{what}: {got:.1}/s over the limit {limit}/s"
    );
    // A guest the host stalls even now and then lets tokens pile up
    // unused (and, past the bucket's size, lost): the pace is the limit's
    // only when nearly every request waited.
    if waited >= 0.9 {
        within(got, limit, 0.15, what);
    } else {
        eprintln!("{what}: {got:.1}/s with {:.0} % of requests waiting: the guests set the pace here, not the limit", waited * 100.0);
    }
}

#[test]
fn a_guest_gets_its_export_s_limit_and_a_live_change_within_a_second() {
    if !ready("rate_limits", &[]) {
        return;
    }
    let fx = Fixture::new();
    let image = fx.image("vm.img", "64M");
    let sock = Fixture::socket_of(&image);
    let ctl_path = fx.path("control.sock");
    let _backend = BlkBackendProcess::start_exports_with(
        &bin("blk-backend"),
        &[],
        &["--control", &s(&ctl_path)],
    )
    .expect("blk-backend");
    let mut ctl = BackendControl::connect(&ctl_path);
    ctl.add(ExportArgs {
        limits: ops(200),
        ..ExportArgs::new(&sock, &image)
    })
    .expect("export-add with limits");
    assert_eq!(ctl.list().unwrap()[0].limits, ops(200));

    // 200 a second: once the bucket's first 200 are spent, the backend
    // lets 200 a second through, and the guest's own clock sees no more.
    let mut vm = reader(&sock, 8000, "");
    let p = Patience::new("the guest at its limit", Duration::from_secs(2));
    vm.wait_for(&p, |c, _| {
        let last = progress(c).last().map_or(0, |l| l.0);
        settled(c, 300).is_some_and(|t| last >= t + 300)
    })
    .expect("progress");
    at_limit(measured(&mut ctl, &[&sock], 2.0), 200.0, "limited to 200");
    let before = vm.console();
    let from = settled(&before, 300).expect("settled") + 200;
    let seen = rate(&before, from);
    assert!(
        seen <= 220.0,
        "the guest saw {seen:.1}/s under a limit of 200"
    );
    // Raised live: a second on, 600 a second.
    ctl.set_limits(&sock, ops(600), None)
        .expect("export-set-limits");
    std::thread::sleep(Duration::from_secs(1));
    at_limit(
        measured(&mut ctl, &[&sock], 2.0),
        600.0,
        "raised to 600, a second on",
    );
    vm.wait()
        .expect("the guest ends")
        .assert_ok("a limited reader");
    let listed = &ctl.list().unwrap()[0];
    assert!(listed.counters.throttled > 0, "{listed:?}");

    // Bytes: 4 MiB a second of 16 KiB reads is 256 of them a second.
    ctl.set_limits(
        &sock,
        Limits {
            ops: None,
            bytes: Some(quarters(4 << 20)),
        },
        None,
    )
    .expect("a bandwidth limit");
    let mut vm = reader(&sock, 6000, "bs=16384");
    vm.wait_for(&p, |c, _| {
        let last = progress(c).last().map_or(0, |l| l.0);
        settled(c, 384).is_some_and(|t| last >= t + 300)
    })
    .expect("progress");
    at_limit(
        measured(&mut ctl, &[&sock], 2.0),
        256.0,
        "4 MiB/s of 16 KiB reads",
    );
    vm.wait()
        .expect("ends")
        .assert_ok("a bandwidth-limited reader");

    // Refused by name, nothing changed.
    refused(
        ctl.set_limits(&sock, ops(0), None),
        "ops: the size must be at least 1",
    );
    refused(
        ctl.set_limits(&sock, ops(10), Some("nosuch")),
        "no rate-limit group \"nosuch\"",
    );
    refused(
        ctl.set_limits(&fx.path("other.sock"), ops(10), None),
        "no export on",
    );
    assert_eq!(ctl.list().unwrap()[0].limits.bytes, Some(quarters(4 << 20)));

    // Unlimited again: nothing waits (whatever pace the host allows).
    ctl.set_limits(&sock, Limits::default(), None)
        .expect("no limits");
    let waited = ctl.list().unwrap()[0].counters.throttled;
    reader(&sock, 1000, "")
        .wait()
        .expect("ends")
        .assert_ok("unlimited");
    assert_eq!(
        ctl.list().unwrap()[0].counters.throttled,
        waited,
        "unlimited"
    );
}

#[test]
fn a_group_holds_the_sum_of_two_exports() {
    if !ready("rate_limits_group", &[]) {
        return;
    }
    let fx = Fixture::new();
    let ctl_path = fx.path("control.sock");
    let _backend = BlkBackendProcess::start_exports_with(
        &bin("blk-backend"),
        &[],
        &["--control", &s(&ctl_path)],
    )
    .expect("blk-backend");
    let mut ctl = BackendControl::connect(&ctl_path);
    refused(
        ctl.add(ExportArgs {
            limit_group: Some("fleet".into()),
            ..ExportArgs::new(fx.path("x.sock"), fx.image("x.img", "16M"))
        }),
        "no rate-limit group \"fleet\"",
    );
    refused(
        ctl.group_set("fleet", ops(0)),
        "the size must be at least 1",
    );
    ctl.group_set("fleet", ops(300)).expect("group-set");
    let socks: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| {
            let image = fx.image(&format!("{n}.img"), "64M");
            let sock = Fixture::socket_of(&image);
            ctl.add(ExportArgs {
                limit_group: Some("fleet".into()),
                ..ExportArgs::new(&sock, &image)
            })
            .expect("an export in the group");
            sock
        })
        .collect();
    let groups = ctl.groups().unwrap();
    assert_eq!(groups[0].exports.len(), 2, "{groups:?}");
    refused(ctl.group_del("fleet"), "is shared by 2 export(s)");

    // Both read as fast as they can at once: together, 300 a second.
    let mut a = reader(&socks[0], 8000, "");
    let mut b = reader(&socks[1], 8000, "");
    let p = Patience::new("both guests at the group's limit", Duration::from_secs(2));
    for vm in [&mut a, &mut b] {
        vm.wait_for(&p, |c, _| settled(c, 300).is_some())
            .expect("progress");
    }
    let pair: Vec<&Path> = socks.iter().map(|s| s.as_path()).collect();
    at_limit(
        measured(&mut ctl, &pair, 2.0),
        300.0,
        "two exports sharing 300",
    );
    a.wait().expect("a ends").assert_ok("a, in the group");
    b.wait().expect("b ends").assert_ok("b, in the group");

    // Out of the group, the group goes.
    for sock in &socks {
        ctl.set_limits(sock, Limits::default(), None)
            .expect("out of the group");
    }
    ctl.group_del("fleet").expect("group-del");
    assert!(ctl.groups().unwrap().is_empty());
}

/// `vmctl run` of two VMs named `name-1`, `name-2` on `base` running
/// `cmdline`, their disks sharing 300 operations a second: running.
fn fleet_of_two(v: &Vmctl, name: &str, base: &str, cmdline: &str) -> std::process::Child {
    std::process::Command::new(bin("vmctl"))
        .args([
            "--state-dir",
            &s(&v.state),
            "run",
            "--count",
            "2",
            "--name",
            name,
        ])
        .args([
            "--image",
            base,
            "--cmdline",
            cmdline,
            "--disk-iops-group",
            "300",
            "--rm",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("vmctl run")
}

#[test]
fn vmctl_limits_a_vm_s_disk_changes_it_live_and_holds_a_fleet_to_one_budget() {
    if !ready("rate_limits_vmctl", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let (base, _) = fx.golden_base();
    let base = s(&base);
    let reading = "mode=randread qd=4 duration_ms=8000 progress_ms=100 size=8M";
    v.ok(&[
        "create",
        "lim",
        "--image",
        &base,
        "--disk-iops",
        "200",
        "--cmdline",
        reading,
    ]);
    assert_eq!(v.info("lim")["disk-iops"], 200);
    v.ok(&["start", "lim"]);
    let disk = v.vm_dir("lim").join("disk.sock");
    let mut ctl = BackendControl::connect(&v.state.join("backend/control.sock"));
    // (The bucket's first second's worth goes at once: measured after.)
    std::thread::sleep(Duration::from_secs(1));
    at_limit(
        measured(&mut ctl, &[&disk], 2.0),
        200.0,
        "vmctl --disk-iops 200",
    );
    // Raised on the running VM: at once.
    let said = v.ok(&["set", "lim", "--disk-iops", "600"]);
    assert!(said.contains("at once"), "{said}");
    std::thread::sleep(Duration::from_secs(1));
    at_limit(
        measured(&mut ctl, &[&disk], 2.0),
        600.0,
        "vmctl set --disk-iops 600, live",
    );
    // Bad values are refused by name, nothing changed.
    let e = v.fails(&["set", "lim", "--disk-iops", "0"]);
    assert!(e.contains("the size must be at least 1"), "{e}");
    let e = v.fails(&["set", "lim", "--disk-iops", "lots"]);
    assert!(e.contains("--disk-iops \"lots\""), "{e}");
    assert_eq!(v.info("lim")["disk-iops"], 600);
    v.ok(&["set", "lim", "--disk-iops", "none"]);
    assert!(v.info("lim")["disk-iops"].is_null());
    v.assert_exits_ok("lim");

    // A fleet of two held to 300 a second between them.
    let mut run = fleet_of_two(&v, "pair", &base, reading);
    let socks: Vec<_> = (1..=2)
        .map(|k| v.vm_dir(&format!("pair-{k}")).join("disk.sock"))
        .collect();
    Patience::new("the fleet's disks served", Duration::from_secs(1))
        .wait_until(|| Ok(socks.iter().all(|s| s.exists())))
        .expect("the fleet runs");
    std::thread::sleep(Duration::from_secs(1));
    let pair: Vec<&Path> = socks.iter().map(|s| s.as_path()).collect();
    at_limit(
        measured(&mut ctl, &pair, 2.0),
        300.0,
        "vmctl run --disk-iops-group 300",
    );
    assert!(
        run.wait().expect("run ends").success(),
        "the fleet's guests exit 0"
    );
    assert!(
        ctl.groups().expect("group-list").is_empty(),
        "the fleet's group is gone"
    );

    // A run killed half-way: its group goes with its VMs (the host
    // backend's housekeeping, about a second).
    let mut run = fleet_of_two(&v, "cut", &base, reading);
    Patience::new("the fleet's group made", Duration::from_secs(1))
        .wait_until(|| Ok(!ctl.groups().expect("group-list").is_empty()))
        .expect("the group");
    run.kill().expect("SIGKILL");
    run.wait().expect("reaped");
    Patience::new("the killed fleet's group dropped", Duration::from_secs(2))
        .wait_until(|| Ok(ctl.groups().expect("group-list").is_empty()))
        .expect("the group goes");
}
