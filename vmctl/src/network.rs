//! Host plumbing for VMs' NICs (`vmctl create --net [BRIDGE]`): a bridge
//! per network (`vmbr0` unless named; when vmctl makes it, the first
//! 10.88.N.0/24 no interface of the namespace uses, and the mark
//! `alias vmctl-root=STATE_ROOT`, so a second state root is refused that
//! bridge by name; else the subnet of the address it has; an interface
//! that is no bridge is refused), a stable MAC and an address
//! from the bridge's subnet per VM (in its definition), and, while the VM
//! runs, a persistent multi-queue tap on the bridge with a `net-backend`
//! serving it. The tap goes when the VM stops; nothing of a deleted VM is
//! left. With `--nat`, the bridge's subnet is masqueraded to the host's
//! other interfaces (nftables, table `ip vmctl`) while a NAT VM on it
//! runs (IPv4 forwarding turned on, and back to what it was with the last
//! NAT rule). `vmctl network ls/rm` lists the bridges and removes one
//! vmctl made that no VM is defined on. Everything goes through `ip`
//! (iproute2) and `nft` in the network namespace vmctl runs in, so vmctl
//! works unchanged inside one.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::state::{lock_file, NicSpec, Root, VmConfig};

/// The bridge's address when vmctl makes it, and the subnet's size.
const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const PREFIX: u8 = 24;

impl NicSpec {
    /// The kernel command line's `ip=` (Linux's form; the bench guest
    /// reads the address before the first ':').
    pub fn kernel_ip_arg(&self, hostname: &str) -> String {
        let mask = Ipv4Addr::from(u32::MAX << (32 - self.prefix));
        format!(
            "ip={}::{}:{}:{}:eth0:off",
            self.address, self.gateway, mask, hostname
        )
    }
}

/// Runs `program` (iproute2's `ip`, `nft`) with `args`: its output, or
/// its error message.
fn run_tool(program: &str, what: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} ({what})"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run_tool("ip", "iproute2", args)
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Checks a bridge name: it becomes an interface name.
pub fn check_bridge_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        bail!("--net {name:?}: a bridge name is 1 to 15 of a-z, A-Z, 0-9, '-' and '_'");
    }
    Ok(())
}

/// The mark a bridge vmctl made carries (its alias): the state root
/// whose VMs it serves. Two state roots never hand out addresses (or run
/// DHCP) on one bridge.
fn owner_alias(root: &Root) -> String {
    format!("vmctl-root={}", root.path.display())
}

/// What is named `name` in this network namespace.
#[derive(Debug, PartialEq, Eq)]
enum Link {
    Absent,
    /// A bridge, and the state root that made it (from its alias), if vmctl did.
    Bridge {
        owner: Option<String>,
    },
    NotABridge,
}

fn link(name: &str) -> Link {
    let Ok(out) = ip(&["-d", "link", "show", "dev", name]) else {
        return Link::Absent;
    };
    if !out.lines().any(|l| l.trim_start().starts_with("bridge ")) {
        return Link::NotABridge;
    }
    let owner = out
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("alias vmctl-root="))
        .map(|o| o.trim().to_string());
    Link::Bridge { owner }
}

/// Refuses a bridge another live state root hands addresses out on, or
/// an interface that is no bridge.
fn check_bridge_use(root: &Root, bridge: &str) -> Result<()> {
    match link(bridge) {
        Link::NotABridge => bail!("--net {bridge}: {bridge} is an interface but not a bridge"),
        Link::Bridge { owner: Some(o) }
            if o != root.path.display().to_string() && Path::new(&o).join("vms").is_dir() =>
        {
            bail!(
                "--net {bridge}: that bridge hands out addresses for vmctl state root {o}; \
                 a VM of this state root goes on another bridge (--net NAME)"
            )
        }
        _ => Ok(()),
    }
}

/// Every IPv4 subnet (network address, prefix) on an interface of this
/// namespace.
fn subnets_in_use() -> Vec<(u32, u8)> {
    let out = ip(&["-4", "-o", "addr", "show"]).unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let cidr = l.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
            let (a, p) = cidr.split_once('/')?;
            let (a, p): (Ipv4Addr, u8) = (a.parse().ok()?, p.parse().ok()?);
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            Some((u32::from(a) & mask, p))
        })
        .collect()
}

/// Whether two subnets overlap.
fn overlap(a: (u32, u8), b: (u32, u8)) -> bool {
    let p = a.1.min(b.1);
    let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
    a.0 & mask == b.0 & mask
}

/// The subnet a bridge vmctl is yet to make gets: the one this state
/// root's VMs on it have, else the first 10.88.N.0/24 that no interface
/// of the namespace and no other bridge of this state root uses.
fn subnet_for_new_bridge(bridge: &str, others: &[VmConfig]) -> Result<(Ipv4Addr, u8)> {
    if let Some(n) = others
        .iter()
        .filter_map(|c| c.net.as_ref())
        .find(|n| n.bridge == bridge)
    {
        return Ok((n.gateway, n.prefix));
    }
    let mut used = subnets_in_use();
    used.extend(others.iter().filter_map(|c| c.net.as_ref()).map(|n| {
        (
            u32::from(n.gateway) & (u32::MAX << (32 - n.prefix)),
            n.prefix,
        )
    }));
    let [a, b, _, _] = DEFAULT_GATEWAY.octets();
    (0..=255u8)
        .map(|n| Ipv4Addr::new(a, b, n, 1))
        .find(|g| {
            !used
                .iter()
                .any(|&u| overlap(u, (u32::from(*g) & (u32::MAX << (32 - PREFIX)), PREFIX)))
        })
        .map(|g| (g, PREFIX))
        .context("no free 10.88.N.0/24 subnet is left for a new bridge")
}

/// The bridge's IPv4 address and prefix, if it has one.
fn bridge_address(bridge: &str) -> Option<(Ipv4Addr, u8)> {
    let out = ip(&["-4", "-o", "addr", "show", "dev", bridge]).ok()?;
    let cidr = out.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
    let (a, p) = cidr.split_once('/')?;
    Some((a.parse().ok()?, p.parse().ok()?))
}

/// A stable hash of `s` (the VM's place and name: its MAC and tap name).
fn hash(s: &str) -> u64 {
    // FNV-1a: the same on every run and every machine.
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Gives VM `name` a NIC on `bridge`: its MAC and tap name from its
/// identity, the first address of the bridge's subnet no other VM has.
/// The caller holds [`allocation_lock`] until the VM's definition is
/// written.
pub fn allocate(
    root: &Root,
    name: &str,
    bridge: &str,
    nat: bool,
    others: &[VmConfig],
) -> Result<NicSpec> {
    check_bridge_name(bridge)?;
    check_bridge_use(root, bridge)?;
    crate::binaries::program("net-backend").map_err(|_| {
        anyhow::anyhow!("--net needs net-backend, neither beside vmctl nor on PATH (cargo build --release -p vhost-net-backend)")
    })?;
    let (gateway, prefix) = match bridge_address(bridge) {
        Some(a) => a,
        None => subnet_for_new_bridge(bridge, others)?,
    };
    if !(8..=30).contains(&prefix) {
        bail!("bridge {bridge}: its subnet /{prefix} is not one vmctl hands addresses out of (/8 to /30)");
    }
    let h = hash(&format!("{}/{name}", root.path.display()));
    let mac = format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (h >> 16) as u8,
        (h >> 8) as u8,
        h as u8
    );
    let taken: Vec<Ipv4Addr> = others
        .iter()
        .filter_map(|c| c.net.as_ref())
        .filter(|n| n.bridge == bridge)
        .map(|n| n.address)
        .collect();
    let mask = u32::MAX << (32 - prefix);
    let net = u32::from(gateway) & mask;
    let hosts = (1u32 << (32 - prefix)) - 2;
    let address = (1..=hosts)
        .map(|i| Ipv4Addr::from(net + i))
        .find(|a| *a != gateway && !taken.contains(a))
        .with_context(|| format!("bridge {bridge}: every address of its /{prefix} is taken"))?;
    Ok(NicSpec {
        bridge: bridge.to_string(),
        mac,
        address,
        gateway,
        prefix,
        tap: format!("vt{:08x}", h as u32),
        nat,
    })
}

fn nft(args: &[&str]) -> Result<String> {
    run_tool("nft", "nftables", args)
}

/// Where a bridge's DHCP server keeps its files: its hosts (MAC,
/// address, name of every VM defined on the bridge) and its pid.
fn dhcp_files(root: &Root, bridge: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = root.path.join("network");
    (
        dir.join(format!("{bridge}.hosts")),
        dir.join(format!("{bridge}.dnsmasq.pid")),
    )
}

fn running_pid(pidfile: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    crate::process::exists(pid).then_some(pid)
}

/// DHCP on the VM's bridge for guests that ask (`ip=dhcp`): dnsmasq, its
/// addresses only the ones vmctl gave (every VM defined on the bridge,
/// by MAC; others get none), started with the bridge's first running VM,
/// told of new VMs (SIGHUP rereads its hosts). None when dnsmasq is not
/// installed (addresses still come on the kernel command line).
pub fn ensure_dhcp(root: &Root, nic: &NicSpec, all: &[VmConfig]) -> Result<()> {
    if Command::new("dnsmasq")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Ok(());
    }
    let (hosts, pidfile) = dhcp_files(root, &nic.bridge);
    std::fs::create_dir_all(root.path.join("network"))?;
    let lines: String = all
        .iter()
        .filter_map(|c| c.net.as_ref().map(|n| (c, n)))
        .filter(|(_, n)| n.bridge == nic.bridge)
        .map(|(c, n)| format!("{},{},{}\n", n.mac, n.address, c.name))
        .collect();
    crate::state::write_atomically(&hosts, lines.as_bytes())?;
    if let Some(pid) = running_pid(&pidfile) {
        // The bridge's dnsmasq rereads its hosts.
        let _ = crate::process::signal(pid, rustix::process::Signal::HUP);
        return Ok(());
    }
    let net = Ipv4Addr::from(u32::from(nic.gateway) & (u32::MAX << (32 - nic.prefix)));
    let mask = Ipv4Addr::from(u32::MAX << (32 - nic.prefix));
    run_tool(
        "dnsmasq",
        "the bridge's DHCP server",
        &[
            "--conf-file=/dev/null",
            // DHCP only: no DNS.
            "--port=0",
            &format!("--interface={}", nic.bridge),
            "--bind-interfaces",
            &format!("--dhcp-range={net},static,{mask},12h"),
            &format!("--dhcp-hostsfile={}", hosts.display()),
            &format!("--dhcp-option=option:router,{}", nic.gateway),
            "--leasefile-ro",
            &format!("--pid-file={}", pidfile.display()),
        ],
    )
    .map(drop)
}

/// The bridge's DHCP server stopped (its last running VM went).
pub fn stop_dhcp(root: &Root, bridge: &str) {
    let (hosts, pidfile) = dhcp_files(root, bridge);
    if let Some(pid) = running_pid(&pidfile) {
        // The bridge's dnsmasq, which vmctl started.
        let _ = crate::process::signal(pid, rustix::process::Signal::TERM);
    }
    let _ = std::fs::remove_file(pidfile);
    let _ = std::fs::remove_file(hosts);
}

/// The comment that names a bridge's masquerade rule.
fn nat_comment(bridge: &str) -> String {
    format!("vmctl nat {bridge}")
}

/// The handle of the bridge's masquerade rule, if there is one.
fn nat_rule(bridge: &str) -> Option<String> {
    let listing = nft(&["-a", "list", "chain", "ip", "vmctl", "postrouting"]).ok()?;
    let want = format!("comment \"{}\"", nat_comment(bridge));
    listing
        .lines()
        .find(|l| l.contains(&want))
        .and_then(|l| l.rsplit("# handle ").next())
        .map(|h| h.trim().to_string())
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Where the namespace's IPv4 forwarding setting is kept while vmctl's
/// NAT needs it on (put back when the last NAT rule goes).
fn forward_saved(root: &Root) -> std::path::PathBuf {
    root.path.join("network").join("ip_forward.before")
}

/// The bridge's subnet masqueraded to every other interface, and the
/// namespace forwarding IPv4 (once per bridge; the setting found is
/// kept, and put back by [`drop_nat`] with the last rule).
pub fn ensure_nat(root: &Root, nic: &NicSpec) -> Result<()> {
    let saved = forward_saved(root);
    if !saved.exists() && nft(&["list", "table", "ip", "vmctl"]).is_err() {
        let before = std::fs::read_to_string(IP_FORWARD).context("reading ip_forward")?;
        std::fs::create_dir_all(root.path.join("network"))?;
        crate::state::write_atomically(&saved, before.trim().as_bytes())?;
    }
    std::fs::write(IP_FORWARD, b"1")
        .context("turning IPv4 forwarding on (/proc/sys/net/ipv4/ip_forward)")?;
    if nat_rule(&nic.bridge).is_some() {
        return Ok(());
    }
    nft(&["add", "table", "ip", "vmctl"])?;
    nft(&[
        "add",
        "chain",
        "ip",
        "vmctl",
        "postrouting",
        "{ type nat hook postrouting priority srcnat; }",
    ])?;
    let net = Ipv4Addr::from(u32::from(nic.gateway) & (u32::MAX << (32 - nic.prefix)));
    let subnet = format!("{net}/{}", nic.prefix);
    let comment = format!("\"{}\"", nat_comment(&nic.bridge));
    nft(&[
        "add",
        "rule",
        "ip",
        "vmctl",
        "postrouting",
        "ip",
        "saddr",
        &subnet,
        "oifname",
        "!=",
        &nic.bridge,
        "masquerade",
        "comment",
        &comment,
    ])?;
    Ok(())
}

/// The bridge's masquerade rule removed (and vmctl's table with its
/// last rule, IPv4 forwarding then set back as it was found).
pub fn drop_nat(root: &Root, bridge: &str) {
    if let Some(handle) = nat_rule(bridge) {
        let _ = nft(&[
            "delete",
            "rule",
            "ip",
            "vmctl",
            "postrouting",
            "handle",
            &handle,
        ]);
    }
    let empty = nft(&["list", "chain", "ip", "vmctl", "postrouting"])
        .is_ok_and(|l| !l.contains("masquerade"));
    if empty {
        let _ = nft(&["delete", "table", "ip", "vmctl"]);
        let saved = forward_saved(root);
        if let Ok(before) = std::fs::read_to_string(&saved) {
            if std::fs::write(IP_FORWARD, before.trim()).is_ok() {
                let _ = std::fs::remove_file(saved);
            }
        }
    }
}

/// Serializes address allocation between concurrent creates.
pub fn allocation_lock(root: &Root) -> Result<std::fs::File> {
    lock_file(&root.path.join("network.lock"), true)?.context("the network allocation lock")
}

/// The bridge up (made, with the gateway's address and this state
/// root's mark, if it is not there).
pub fn ensure_bridge(root: &Root, nic: &NicSpec) -> Result<()> {
    if link_exists(&nic.bridge) {
        return Ok(());
    }
    // Two VMs starting at once: one makes it; the other finds it made.
    if let Err(e) = ip(&["link", "add", &nic.bridge, "type", "bridge"]) {
        if !link_exists(&nic.bridge) {
            return Err(e);
        }
        return Ok(());
    }
    let cidr = format!("{}/{}", nic.gateway, nic.prefix);
    ip(&[
        "link",
        "set",
        "dev",
        &nic.bridge,
        "alias",
        &owner_alias(root),
    ])?;
    ip(&["addr", "add", &cidr, "dev", &nic.bridge])?;
    ip(&["link", "set", &nic.bridge, "up"])?;
    Ok(())
}

/// A bridge of this state root as `vmctl network ls` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BridgeInfo {
    pub name: String,
    pub subnet: Option<String>,
    /// Made by vmctl for this state root (and removed by `network rm`).
    pub made_by_vmctl: bool,
    pub exists: bool,
    pub vms: Vec<String>,
}

/// The bridges this state root's VMs are defined on, and those it made.
pub fn list(root: &Root, all: &[VmConfig]) -> Vec<BridgeInfo> {
    let mut names: Vec<String> = all
        .iter()
        .filter_map(|c| c.net.as_ref().map(|n| n.bridge.clone()))
        .collect();
    let ours = Some(root.path.display().to_string());
    if let Ok(out) = ip(&["-o", "link", "show", "type", "bridge"]) {
        for l in out.lines() {
            let Some(n) = l.split(':').nth(1).map(|n| n.trim().to_string()) else {
                continue;
            };
            if matches!(link(&n), Link::Bridge { owner } if owner == ours) {
                names.push(n);
            }
        }
    }
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let l = link(&name);
            BridgeInfo {
                subnet: bridge_address(&name).map(|(a, p)| format!("{a}/{p}")),
                made_by_vmctl: matches!(&l, Link::Bridge { owner: Some(o) } if *o == root.path.display().to_string()),
                exists: l != Link::Absent,
                vms: all
                    .iter()
                    .filter(|c| c.net.as_ref().is_some_and(|n| n.bridge == name))
                    .map(|c| c.name.clone())
                    .collect(),
                name,
            }
        })
        .collect()
}

/// `vmctl network rm BRIDGE`: a bridge this state root made and no VM of
/// it is defined on, removed with its DHCP server and NAT rule.
pub fn remove(root: &Root, bridge: &str, all: &[VmConfig]) -> Result<()> {
    check_bridge_name(bridge)?;
    let on: Vec<&str> = all
        .iter()
        .filter(|c| c.net.as_ref().is_some_and(|n| n.bridge == bridge))
        .map(|c| c.name.as_str())
        .collect();
    if !on.is_empty() {
        bail!(
            "bridge {bridge} has VMs defined on it ({}): delete them first",
            on.join(", ")
        );
    }
    match link(bridge) {
        Link::Absent => bail!("no bridge named {bridge}"),
        Link::Bridge { owner: Some(o) } if o == root.path.display().to_string() => {}
        _ => bail!("bridge {bridge} was not made by vmctl for this state root: left as it is"),
    }
    stop_dhcp(root, bridge);
    drop_nat(root, bridge);
    ip(&["link", "del", "dev", bridge])?;
    Ok(())
}

/// The VM's tap made (persistent, multi-queue, with virtio-net headers),
/// on its bridge and up; one left by a crashed run is made again.
pub fn plug(root: &Root, nic: &NicSpec) -> Result<()> {
    ensure_bridge(root, nic)?;
    if link_exists(&nic.tap) {
        unplug(nic);
    }
    ip(&[
        "tuntap",
        "add",
        "dev",
        &nic.tap,
        "mode",
        "tap",
        "multi_queue",
        "vnet_hdr",
    ])?;
    let plugged = ip(&["link", "set", &nic.tap, "master", &nic.bridge])
        .and_then(|_| ip(&["link", "set", &nic.tap, "up"]));
    if let Err(e) = plugged {
        unplug(nic);
        return Err(e);
    }
    Ok(())
}

/// The VM's tap gone (and with it its bridge port).
pub fn unplug(nic: &NicSpec) {
    let _ = ip(&["link", "del", "dev", &nic.tap]);
}

/// The `--net` of the VM's vmm.
pub fn vmm_arg(nic: &NicSpec, socket: &Path, connect_timeout_ms: u64) -> String {
    format!(
        "socket={},mac={},connect_timeout_ms={connect_timeout_ms}",
        socket.display(),
        nic.mac
    )
}
