//! A container registry of the test's own: Debian's `docker-registry`
//! (the CNCF distribution registry, 2.8) on 127.0.0.1, its storage and
//! its log in a directory the test gives, stopped when dropped. Its access
//! log says which blobs a client fetched.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::patience::Patience;

pub struct LocalRegistry {
    child: Child,
    /// host:port, as references name it.
    pub address: String,
    /// Where it keeps blobs (docker/registry/v2/blobs/sha256/..).
    pub storage: PathBuf,
    pub log: PathBuf,
}

impl LocalRegistry {
    /// A registry keeping its data under `dir`, plain HTTP, anonymous.
    pub fn start(dir: &Path) -> Result<LocalRegistry> {
        Self::start_with(dir, None)
    }

    /// The same over TLS (a certificate for 127.0.0.1 that a CA of its
    /// own signed; the CA's certificate is `dir/ca.crt`) asking for `user`'s `password` (basic
    /// auth from an htpasswd file, bcrypt, as the registry requires).
    pub fn start_tls(dir: &Path, user: &str, password: &str) -> Result<LocalRegistry> {
        // A CA of its own, and the registry's certificate for 127.0.0.1
        // signed by it (a self-signed CA certificate is refused as a
        // server's own by webpki, rightly).
        let openssl = |args: &[&str]| -> Result<()> {
            let st = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("openssl")?;
            if !st.success() {
                bail!("openssl {args:?}: {st}");
            }
            Ok(())
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test registry CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "registry.key",
            "-out",
            "registry.csr",
        ])?;
        std::fs::write(
            dir.join("registry.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "registry.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "registry.ext",
            "-out",
            "registry.crt",
        ])?;
        let (crt, key) = (dir.join("registry.crt"), dir.join("registry.key"));
        let htpasswd = dir.join("htpasswd");
        let hash = bcrypt::hash(password, 4).context("bcrypt")?;
        std::fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
        let extra = format!(
            "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: test\n    path: {}\n",
            crt.display(),
            key.display(),
            htpasswd.display()
        );
        Self::start_with(dir, Some(&extra))
    }

    fn start_with(dir: &Path, extra: Option<&str>) -> Result<LocalRegistry> {
        // A free port: another process may take it between our probe and
        // the registry's bind, in which case the registry exits and the
        // next port is tried.
        let mut last = None;
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            match Self::start_on(dir, port, extra.unwrap_or("")) {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried"))
    }

    /// `extra`: YAML lines after `http`'s address (its tls), and more.
    fn start_on(dir: &Path, port: u16, extra: &str) -> Result<LocalRegistry> {
        let storage = dir.join("registry-data");
        std::fs::create_dir_all(&storage)?;
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                storage.display()
            ),
        )?;
        let log = dir.join("registry.log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::OpenOptions::new().append(true).open(&log)?)
            .spawn()
            .context("starting docker-registry")?;
        let address = format!("127.0.0.1:{port}");
        // It answers within tens of milliseconds.
        let up = Patience::new("docker-registry listening", Duration::from_millis(100)).wait_until(
            || {
                if let Some(st) = child.try_wait()? {
                    bail!(
                        "docker-registry ended ({st}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                Ok(TcpStream::connect(&address).is_ok())
            },
        );
        if let Err(e) = up {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(LocalRegistry {
            child,
            address,
            storage,
            log,
        })
    }

    /// The blobs a client fetched (GET .../blobs/DIGEST answered 200), in
    /// the order of the access log.
    pub fn blobs_fetched(&self) -> Vec<String> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("HTTP/1.1\" 200"))
            .filter_map(|l| {
                let path = l.split("\"GET ").nth(1)?.split(' ').next()?;
                let digest = path.split("/blobs/").nth(1)?;
                Some(digest.to_string())
            })
            .collect()
    }

    /// Pushes an ordinary container image of one layer (a file `/pause`),
    /// not a VM image, as `repository:tag`: umoci builds it in an OCI
    /// layout under `dir`, skopeo copies it here. Its reference.
    pub fn push_container_image(&self, dir: &Path, repository_tag: &str) -> Result<String> {
        let layout = dir.join("oci-layout-dir");
        let image = format!("{}:{}", layout.display(), "img");
        let file = dir.join("pause");
        std::fs::write(&file, b"not a VM\n")?;
        let run = |program: &str, args: &[&str]| -> Result<()> {
            let out = Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("starting {program}"))?;
            if !out.status.success() {
                bail!(
                    "{program} {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        };
        let layout_s = layout.to_string_lossy();
        run("umoci", &["init", "--layout", &layout_s])?;
        run("umoci", &["new", "--image", &image])?;
        run(
            "umoci",
            &[
                "insert",
                "--image",
                &image,
                &file.to_string_lossy(),
                "/pause",
            ],
        )?;
        run(
            "umoci",
            &["config", "--image", &image, "--config.entrypoint", "/pause"],
        )?;
        let reference = format!("{}/{repository_tag}", self.address);
        run(
            "skopeo",
            &[
                "copy",
                "--dest-tls-verify=false",
                &format!("oci:{image}"),
                &format!("docker://{reference}"),
            ],
        )?;
        Ok(reference)
    }

    /// The file the registry keeps blob `digest` in.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Ends it now (a registry gone mid-operation).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}
