//! VM images through a registry: what a base and then an update of it
//! cost on the wire and in seconds, pushed and pulled as this project
//! lays them out (a layer per sealed layer: the update is the clone's own
//! layer) against KubeVirt's containerDisk (the disk as one qcow2 in a
//! layer: the update is the whole disk again), same data, same registry
//! (Debian's docker-registry on 127.0.0.1), one run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bench::table::{
    Align::{Left, Right},
    Table,
};
use clap::Parser;
use image_format::{Disk, Env, RealEnv};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use serde::Serialize;
use test_infra::LocalRegistry;
use vm_oci::{PushSource, Registry, RegistryOptions, Store, VmDefaults};

#[derive(Parser)]
#[command(
    about = "VM images through a registry: layer per sealed layer vs containerDisk (qcow2 in a layer)"
)]
struct Args {
    /// The disk's virtual size.
    #[arg(long, default_value = "4G", value_parser = cli_support::parse_size)]
    size: u64,
    /// Data the base holds (random, so nothing compresses it away).
    #[arg(long, default_value = "1G", value_parser = cli_support::parse_size)]
    data: u64,
    /// Data the update (a clone of the base) writes.
    #[arg(long, default_value = "16M", value_parser = cli_support::parse_size)]
    update: u64,
    /// Where the images, the registry's storage and the stores go.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    #[command(flatten)]
    out: bench::OutputArgs,
}

#[derive(Debug, Serialize)]
struct Step {
    layout: &'static str,
    step: &'static str,
    bytes: u64,
    seconds: f64,
}

fn env() -> Arc<dyn Env> {
    Arc::new(RealEnv)
}

/// Writes `len` bytes of seeded random data at `offset`, 4 MiB at a time.
fn fill(path: &Path, offset: u64, len: u64, seed: u64) -> Result<()> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut d = Disk::open(env(), path, true)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        d.write_at(&buf[..n], offset + at)?;
        at += n as u64;
    }
    d.close()?;
    Ok(())
}

/// The containerDisk of `snapshot`: its chain converted to one qcow2 (as
/// `img convert`, like `qemu-img convert`, writes it), in a tar as
/// `disk/disk.qcow2`, pushed with a minimal config; bytes uploaded.
fn push_container_disk(bins: &Path, snapshot: &Path, reference: &str, work: &Path) -> Result<u64> {
    let qcow2 = work.join("disk.qcow2");
    let _ = std::fs::remove_file(&qcow2);
    let st = std::process::Command::new(bins)
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(snapshot)
        .arg(&qcow2)
        .status()?;
    anyhow::ensure!(st.success(), "img convert to qcow2 failed");
    let tar = work.join("disk.tar");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tar)?);
    vm_oci::layout::write_tar(&[("disk/disk.qcow2".to_string(), &qcow2)], &mut out)?;
    drop(out);
    let r = Registry::connect(reference, &RegistryOptions::default())?;
    let (layer, layer_size) = vm_oci::layout::digest_of(&mut std::fs::File::open(&tar)?)?;
    let mut sent = 0;
    if !r.blob_exists(&layer)? {
        r.push_blob(&layer, layer_size, Box::new(std::fs::File::open(&tar)?))?;
        sent += layer_size;
    }
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{layer}"]}}}}"#
    )
    .into_bytes();
    let (config_digest, config_size) = vm_oci::layout::digest_of(&mut &config[..])?;
    if !r.blob_exists(&config_digest)? {
        r.push_blob(
            &config_digest,
            config_size,
            Box::new(std::io::Cursor::new(config)),
        )?;
        sent += config_size;
    }
    r.push_manifest(OciImageManifest {
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
        config: OciDescriptor {
            media_type: vm_oci::layout::CONFIG_MEDIA_TYPE.into(),
            digest: config_digest,
            size: config_size as i64,
            ..OciDescriptor::default()
        },
        layers: vec![OciDescriptor {
            media_type: vm_oci::layout::LAYER_MEDIA_TYPE.into(),
            digest: layer,
            size: layer_size as i64,
            ..OciDescriptor::default()
        }],
        ..OciImageManifest::default()
    })?;
    let _ = std::fs::remove_file(&qcow2);
    let _ = std::fs::remove_file(&tar);
    Ok(sent)
}

/// A containerDisk pulled as a runtime would: its one layer downloaded
/// (digest checked); bytes fetched.
fn pull_container_disk(reference: &str, work: &Path) -> Result<u64> {
    let r = Registry::connect(reference, &RegistryOptions::default())?;
    let (manifest, _, _) = r.manifest_and_config()?;
    let mut got = 0;
    for l in &manifest.layers {
        let to = work.join("pulled.tar");
        r.pull_blob(l, &to)?;
        got += l.size as u64;
        let _ = std::fs::remove_file(&to);
    }
    Ok(got)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let img = bench::release_binary("img")?;
    let scratch = tempfile::Builder::new()
        .prefix("bench-registry-")
        .tempdir_in(&a.dir)
        .context("a scratch directory")?;
    let dir = scratch.path();
    let reg = LocalRegistry::start(dir)?;
    eprintln!("making the base: {} of data in a {} disk", a.data, a.size);
    let base = dir.join("base.img");
    image_format::ops::create(env().as_ref(), &base, Some(a.size), 4096, None)?;
    fill(&base, 0, a.data, 1)?;
    let golden = image_format::ops::snapshot_create(env().as_ref(), &base, "golden")?;
    let clone = dir.join("clone.img");
    image_format::ops::clone(env().as_ref(), &golden, &clone)?;
    fill(&clone, a.size / 2, a.update, 2)?;
    let v2 = image_format::ops::snapshot_create(env().as_ref(), &clone, "v2")?;
    let opts = RegistryOptions::default();
    let mut steps = Vec::new();
    let mut timed = |layout, step, f: &mut dyn FnMut() -> Result<u64>| -> Result<()> {
        // What the last step wrote goes to disk now, not in this one.
        rustix::fs::sync();
        eprintln!("{layout}: {step}");
        let t = Instant::now();
        let bytes = f()?;
        steps.push(Step {
            layout,
            step,
            bytes,
            seconds: t.elapsed().as_secs_f64(),
        });
        Ok(())
    };
    let ours = |tag: &str| format!("{}/vms/disk:{tag}", reg.address);
    let cd = |tag: &str| format!("{}/containerdisk/disk:{tag}", reg.address);
    let src = |s: &Path| PushSource {
        snapshot: s.to_path_buf(),
        kernel: None,
        initrd: None,
        defaults: VmDefaults::default(),
        vm_state: None,
    };
    let quiet = &mut |_: &str| {};
    let store = Store::open(&dir.join("store"))?;
    // Host A's store: what it pushed, so the update's push does not remake
    // the base's blob (as vmctl image push does).
    let pushed = Store::open(&dir.join("host-a"))?;
    timed("layer per sealed layer", "push the base", &mut || {
        Ok(vm_oci::transferred_bytes(
            &vm_oci::push(
                &src(&golden),
                &ours("golden"),
                &opts,
                dir,
                Some(&pushed),
                quiet,
            )?
            .blobs,
        ))
    })?;
    timed("layer per sealed layer", "push the update", &mut || {
        Ok(vm_oci::transferred_bytes(
            &vm_oci::push(&src(&v2), &ours("v2"), &opts, dir, Some(&pushed), quiet)?.blobs,
        ))
    })?;
    timed("layer per sealed layer", "pull the base", &mut || {
        Ok(vm_oci::transferred_bytes(
            &vm_oci::pull(&store, &ours("golden"), &opts, quiet)?.blobs,
        ))
    })?;
    timed("layer per sealed layer", "pull the update", &mut || {
        Ok(vm_oci::transferred_bytes(
            &vm_oci::pull(&store, &ours("v2"), &opts, quiet)?.blobs,
        ))
    })?;
    timed(
        "containerDisk (qcow2 in a layer)",
        "push the base",
        &mut || push_container_disk(&img, &golden, &cd("golden"), dir),
    )?;
    timed(
        "containerDisk (qcow2 in a layer)",
        "push the update",
        &mut || push_container_disk(&img, &v2, &cd("v2"), dir),
    )?;
    timed(
        "containerDisk (qcow2 in a layer)",
        "pull the base",
        &mut || pull_container_disk(&cd("golden"), dir),
    )?;
    timed(
        "containerDisk (qcow2 in a layer)",
        "pull the update",
        &mut || pull_container_disk(&cd("v2"), dir),
    )?;

    let mut t = Table::new([
        ("layout", Left),
        ("step", Left),
        ("bytes on the wire", Right),
        ("over the data moved", Right),
        ("seconds", Right),
    ]);
    for s in &steps {
        let data = if s.step.contains("update") {
            a.update
        } else {
            a.data
        };
        t.row([
            s.layout.to_string(),
            s.step.to_string(),
            s.bytes.to_string(),
            format!("{:.3}", s.bytes as f64 / data as f64),
            format!("{:.2}", s.seconds),
        ]);
    }
    let md = format!(
        "# VM images through a registry\n\nA {} disk holding {} of random data, then a clone of it writing {} more; pushed to and pulled from a docker-registry 2.8 on 127.0.0.1 (plain HTTP, this machine's disk). \"Over the data moved\": bytes on the wire over the data the step is about (the base's, then the update's).\n\n{t}",
        a.size, a.data, a.update
    );
    a.out.report(&md, &steps)?;
    Ok(())
}
