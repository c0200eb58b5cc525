//! Push and pull through a real registry (Debian's docker-registry on
//! 127.0.0.1): a base, then a clone of it on which a guest's writes are
//! stood in for by library writes; two stores playing two hosts; only what
//! the other side lacks crosses, by the registry's own access log; bad
//! input (a tampered blob, a missing blob, a registry gone, an image that
//! is not ours) refused by name with nothing half-made in the store, and
//! the next pull working.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image_format::{Disk, Env, RealEnv};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use test_infra::{have, LocalRegistry};
use vm_oci::layout::VmDefaults;
use vm_oci::{pull, push, PushSource, RegistryOptions, Store};

const MIB: u64 = 1 << 20;

fn env() -> Arc<dyn Env> {
    Arc::new(RealEnv)
}

/// Writes `len` bytes of `seed`'s pattern at `offset` of the writable
/// image `path`.
fn write(path: &Path, offset: u64, len: u64, seed: u8) {
    let mut d = Disk::open(env(), path, true).expect("open for writing");
    let buf: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    d.write_at(&buf, offset).expect("write");
    d.close().expect("close");
}

fn read_all(path: &Path) -> Vec<u8> {
    let d = Disk::open(env(), path, false).expect("open");
    let mut buf = vec![0u8; d.virtual_size() as usize];
    d.read_at(&mut buf, 0).expect("read");
    buf
}

/// base.img (32 MiB) with 4 MiB written, sealed as base.img@golden; a
/// clone of it with 1 MiB more, sealed as clone.img@v2.
fn images(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.img");
    image_format::ops::create(env().as_ref(), &base, Some(32 * MIB), 4096, None).expect("create");
    write(&base, 0, 4 * MIB, 7);
    let golden =
        image_format::ops::snapshot_create(env().as_ref(), &base, "golden").expect("snapshot");
    let clone = dir.join("clone.img");
    image_format::ops::clone(env().as_ref(), &golden, &clone).expect("clone");
    write(&clone, 8 * MIB, MIB, 9);
    let v2 = image_format::ops::snapshot_create(env().as_ref(), &clone, "v2").expect("snapshot");
    (golden, v2)
}

fn source(snapshot: &Path) -> PushSource {
    PushSource {
        snapshot: snapshot.to_path_buf(),
        kernel: None,
        initrd: None,
        defaults: VmDefaults {
            cpus: Some(2),
            memory: Some(256 * MIB),
            cmdline: Some("mode=idle".into()),
            queues: None,
        },
        vm_state: None,
    }
}

fn quiet(_: &str) {}

fn store_is_clean(root: &Path) {
    let tmp: Vec<_> = std::fs::read_dir(root.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "work files left: {tmp:?}");
    for e in std::fs::read_dir(root.join("layers")).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(!n.ends_with("-tmp"), "a half-made layer left: {n}");
    }
}

#[test]
fn a_clone_travels_as_its_own_layer_and_a_second_host_fetches_only_what_it_lacks() {
    if !have("docker-registry", "vm_oci_registry") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reg = LocalRegistry::start(dir.path()).expect("registry");
    let (golden, v2) = images(dir.path());
    let opts = RegistryOptions::default();
    let base_ref = format!("{}/vm/base:golden", reg.address);
    let clone_ref = format!("{}/vm/base:v2", reg.address);

    // Host A pushes the base, then the clone: the base's layer again is
    // the same blob, which the registry has.
    let one = push(
        &source(&golden),
        &base_ref,
        &opts,
        dir.path(),
        None,
        &mut quiet,
    )
    .expect("push base");
    assert_eq!(
        one.blobs.iter().filter(|b| b.transferred).count(),
        2,
        "{one:?}"
    );
    let two = push(
        &source(&v2),
        &clone_ref,
        &opts,
        dir.path(),
        None,
        &mut quiet,
    )
    .expect("push clone");
    let uploaded: Vec<_> = two.blobs.iter().filter(|b| b.transferred).collect();
    // The clone's layer and its config; its base's layer was there.
    assert_eq!(uploaded.len(), 2, "{two:?}");
    assert_eq!(
        two.blobs[0].digest, one.blobs[0].digest,
        "the same sealed layer, the same blob"
    );
    let clone_layer = &two.blobs[1];
    assert!(
        clone_layer.size >= MIB && clone_layer.size < MIB + MIB / 10,
        "the clone's layer carries its 1 MiB: {} bytes",
        clone_layer.size
    );
    // Pushing the same snapshot again uploads nothing.
    let again = push(
        &source(&v2),
        &clone_ref,
        &opts,
        dir.path(),
        None,
        &mut quiet,
    )
    .expect("push again");
    assert_eq!(vm_oci::transferred_bytes(&again.blobs), 0, "{again:?}");
    assert_eq!(again.manifest_digest, two.manifest_digest);

    // Host B pulls the base, then the clone: only the clone's layer.
    let b = Store::open(&dir.path().join("host-b")).unwrap();
    let fetched_before = reg.blobs_fetched().len();
    let p1 = pull(&b, &base_ref, &opts, &mut quiet).expect("pull base");
    assert_eq!(p1.blobs.iter().filter(|x| x.transferred).count(), 1);
    let p2 = pull(&b, &clone_ref, &opts, &mut quiet).expect("pull clone");
    let fetched: Vec<_> = p2.blobs.iter().filter(|x| x.transferred).collect();
    assert_eq!(fetched.len(), 1, "{p2:?}");
    assert_eq!(fetched[0].digest, clone_layer.digest);
    // The registry saw the same: the base's layer once, the clone's once
    // (configs aside).
    let log: Vec<String> = reg.blobs_fetched()[fetched_before..].to_vec();
    let layers_fetched: Vec<&String> = log
        .iter()
        .filter(|d| **d == one.blobs[0].digest || **d == clone_layer.digest)
        .collect();
    assert_eq!(
        layers_fetched,
        [&one.blobs[0].digest, &clone_layer.digest],
        "{log:?}"
    );
    // The pulled chain reads as the pushed one, and keeps the defaults.
    let top = b.layer_path(*p2.record.layers.last().unwrap());
    assert_eq!(read_all(&top), read_all(&v2));
    assert_eq!(p2.record.defaults.cpus, Some(2));
    assert_eq!(b.record(&clone_ref).unwrap().as_ref(), Some(&p2.record));
    // A second pull of either fetches nothing.
    // Host B's layers, restored from the blobs, make the same blobs again:
    // pushed from B under another tag of the repository, nothing is
    // uploaded but the manifest, without B remembering any digest. (A
    // registry keeps blobs per repository: another repository would take
    // them again.)
    let b_top = PushSource {
        snapshot: top.clone(),
        ..source(&v2)
    };
    let from_b = push(
        &b_top,
        &format!("{}/vm/base:copy", reg.address),
        &opts,
        dir.path(),
        None,
        &mut quiet,
    )
    .expect("push from host B");
    assert_eq!(vm_oci::transferred_bytes(&from_b.blobs), 0, "{from_b:?}");
    assert_eq!(from_b.manifest_digest, two.manifest_digest);
    // With the digests a store remembers, a push does not remake the
    // blobs the registry has.
    let known = Store::open(&dir.path().join("host-a")).unwrap();
    let base_repo = format!("{}/vm/base", reg.address);
    known
        .remember_blob(
            two.blobs[0].uuid.unwrap(),
            &two.blobs[0].digest,
            two.blobs[0].size,
            &base_repo,
        )
        .unwrap();
    let mut said = Vec::new();
    push(
        &source(&v2),
        &clone_ref,
        &opts,
        dir.path(),
        Some(&known),
        &mut |l| said.push(l.to_string()),
    )
    .expect("push with known blobs");
    assert!(said[0].contains("is there already"), "{said:?}");
    assert_eq!(
        known.blob_of(two.blobs[1].uuid.unwrap()).map(|b| b.digest),
        Some(two.blobs[1].digest.clone())
    );
    // Into another repository of the registry (which keeps blobs per
    // repository): the layers are linked from where the store knows
    // them to be, not uploaded again; only the config goes.
    let other = push(
        &source(&v2),
        &format!("{}/team/vm:v2", reg.address),
        &opts,
        dir.path(),
        Some(&known),
        &mut quiet,
    )
    .expect("push into another repository");
    let sent: Vec<_> = other.blobs.iter().filter(|b| b.transferred).collect();
    assert_eq!(sent.len(), 1, "{other:?}");
    assert!(sent[0].uuid.is_none(), "only the config: {other:?}");
    assert_eq!(
        known
            .blob_of(two.blobs[0].uuid.unwrap())
            .unwrap()
            .repositories,
        [base_repo.clone(), format!("{}/team/vm", reg.address)]
    );
    let p3 = pull(&b, &clone_ref, &opts, &mut quiet).expect("pull again");
    assert_eq!(vm_oci::transferred_bytes(&p3.blobs), 0);
    store_is_clean(b.root());
}

#[test]
fn bad_blobs_and_a_lost_registry_leave_nothing_half_made_and_the_next_pull_works() {
    if !have("docker-registry", "vm_oci_registry_failures") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut reg = LocalRegistry::start(dir.path()).expect("registry");
    let (_, v2) = images(dir.path());
    let opts = RegistryOptions::default();
    let clone_ref = format!("{}/vm/base:v2", reg.address);
    let pushed = push(
        &source(&v2),
        &clone_ref,
        &opts,
        dir.path(),
        None,
        &mut quiet,
    )
    .expect("push");
    let clone_blob = reg.blob_file(&pushed.blobs[1].digest);
    let good = std::fs::read(&clone_blob).unwrap();
    let store_dir = dir.path().join("host-b");
    let b = Store::open(&store_dir).unwrap();

    // A tampered blob: its digest does not match; the base layer pulled
    // before it stays, the clone's is not there.
    let mut bad = good.clone();
    let at = bad.len() / 3;
    bad[at] ^= 0xff;
    std::fs::write(&clone_blob, &bad).unwrap();
    let e = pull(&b, &clone_ref, &opts, &mut quiet)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("downloading blob") && e.contains(&pushed.blobs[1].digest),
        "{e}"
    );
    store_is_clean(&store_dir);
    assert!(b.has_layer(pushed.blobs[0].uuid.unwrap(), None));
    assert!(!b.layer_path(pushed.blobs[1].uuid.unwrap()).exists());
    assert_eq!(b.record(&clone_ref).unwrap(), None);

    // A missing blob.
    std::fs::remove_file(&clone_blob).unwrap();
    let e = pull(&b, &clone_ref, &opts, &mut quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&pushed.blobs[1].digest), "{e}");
    store_is_clean(&store_dir);

    // Put back, it pulls; only the missing layer is fetched.
    std::fs::write(&clone_blob, &good).unwrap();
    let p = pull(&b, &clone_ref, &opts, &mut quiet).expect("pull");
    assert_eq!(p.blobs.iter().filter(|x| x.transferred).count(), 1, "{p:?}");
    assert_eq!(read_all(&b.layer_path(p.record.layers[1])), read_all(&v2));

    // An image that is not ours (a container image's config, no VM
    // labels): refused before anything is fetched.
    let foreign = format!("{}/other/app:1", reg.address);
    let r = vm_oci::Registry::connect(&foreign, &opts).unwrap();
    let config = br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let (digest, size) = vm_oci::layout::digest_of(&mut &config[..]).unwrap();
    r.push_blob(&digest, size, Box::new(std::io::Cursor::new(config)))
        .unwrap();
    r.push_manifest(OciImageManifest {
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
        config: OciDescriptor {
            media_type: vm_oci::layout::CONFIG_MEDIA_TYPE.into(),
            digest,
            size: size as i64,
            ..OciDescriptor::default()
        },
        ..OciImageManifest::default()
    })
    .unwrap();
    drop(r);
    let e = pull(&b, &foreign, &opts, &mut quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no io.vmctl.image.format label"), "{e}");
    assert_eq!(b.record(&foreign).unwrap(), None);
    store_is_clean(&store_dir);

    // The registry gone: a clear error naming it, nothing left behind.
    reg.kill();
    let c = Store::open(&dir.path().join("host-c")).unwrap();
    let e = pull(&c, &clone_ref, &opts, &mut quiet)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with(&format!("registry {}", reg.address)), "{e}");
    store_is_clean(c.root());
}

/// A store on a full filesystem: the pull fails with the filesystem's
/// error, leaves no work file and no half layer, and once there is room
/// the next pull works. (Root only: it mounts a small tmpfs.)
#[test]
fn a_full_disk_fails_the_pull_cleanly_and_the_next_one_works() {
    if !have("docker-registry", "vm_oci_full_disk") {
        return;
    }
    if !rustix::process::geteuid().is_root() {
        println!("SKIPPED: vm_oci_full_disk: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reg = LocalRegistry::start(dir.path()).expect("registry");
    let (golden, _) = images(dir.path());
    let opts = RegistryOptions::default();
    let base_ref = format!("{}/vm/base:golden", reg.address);
    push(
        &source(&golden),
        &base_ref,
        &opts,
        dir.path(),
        None,
        &mut quiet,
    )
    .expect("push");
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mount = |opts: &str| {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&mnt)
            .status()
            .expect("mount");
        assert!(st.success(), "mount -o {opts}");
    };
    // Room for the store's directories, not for a 4 MiB layer.
    mount("size=2M");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let store = Store::open(&mnt.join("store")).unwrap();
    let e = pull(&store, &base_ref, &opts, &mut quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("No space left on device"), "{e}");
    store_is_clean(store.root());
    assert_eq!(store.record(&base_ref).unwrap(), None);
    mount("remount,size=64M");
    let p = pull(&store, &base_ref, &opts, &mut quiet).expect("pull with room");
    assert_eq!(
        read_all(&store.layer_path(p.record.layers[0])),
        read_all(&golden)
    );
    store_is_clean(store.root());
}

/// A registry over TLS with basic auth, as a team's registry is: its CA
/// trusted the docker way (`certs.d/HOST:PORT/ca.crt`), the password from
/// a docker config; without the CA, or without the password, a clear
/// error naming the registry; with both, push and pull.
#[test]
fn a_tls_registry_with_basic_auth_takes_the_docker_config_s_credentials() {
    if !have("docker-registry", "vm_oci_tls_auth") || !have("openssl", "vm_oci_tls_auth") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reg = LocalRegistry::start_tls(dir.path(), "fleet", "s3cret").expect("registry");
    let (golden, _) = images(dir.path());
    let reference = format!("{}/vm/base:golden", reg.address);
    // A certs.d as docker keeps it: HOST:PORT/ca.crt.
    let certs_d = |name: &str, ca: &str| -> PathBuf {
        let d = dir.path().join(name);
        std::fs::create_dir_all(d.join(&reg.address)).unwrap();
        std::fs::copy(dir.path().join(ca), d.join(&reg.address).join("ca.crt")).unwrap();
        d
    };
    let opts = RegistryOptions {
        insecure: false,
        certs_dir: Some(certs_d("certs.d", "ca.crt")),
        auth_file: Some(dir.path().join("docker/config.json")),
    };
    // A docker config of the test's own.
    let docker = dir.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let config = |auths: &str| {
        std::fs::write(
            docker.join("config.json"),
            format!(r#"{{"auths": {{{auths}}}}}"#),
        )
        .unwrap()
    };
    // A push that must fail, naming the registry and `why`.
    let refused = |o: &RegistryOptions, why: &str| {
        let e = push(
            &source(&golden),
            &reference,
            o,
            dir.path(),
            None,
            &mut quiet,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&format!("registry {}", reg.address)) && e.contains(why),
            "{e}"
        );
    };
    // No credentials: refused by the registry.
    config("");
    refused(&opts, "401 Unauthorized");
    // The right credentials, but another CA than its own trusted (the
    // registry's own certificate, which signs nothing).
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("fleet:s3cret");
    config(&format!(r#""{}": {{"auth": "{auth}"}}"#, reg.address));
    let untrusted = RegistryOptions {
        certs_dir: Some(certs_d("wrong-certs", "registry.crt")),
        ..opts.clone()
    };
    refused(&untrusted, "invalid peer certificate");
    // Both: it goes there and back.
    push(
        &source(&golden),
        &reference,
        &opts,
        dir.path(),
        None,
        &mut quiet,
    )
    .expect("push over TLS");
    let b = Store::open(&dir.path().join("host-b")).unwrap();
    let p = pull(&b, &reference, &opts, &mut quiet).expect("pull over TLS");
    assert_eq!(
        read_all(&b.layer_path(p.record.layers[0])),
        read_all(&golden)
    );
}
