//! One repository of one registry, spoken to with oci-client (the OCI
//! distribution protocol) on a private single-threaded tokio runtime, so
//! that callers stay synchronous. Credentials come from the docker config
//! (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, its
//! credential helpers too), as docker, skopeo and containerd read them;
//! none there means anonymous. TLS always, except with `insecure` or for
//! a registry on this host (localhost, 127.0.0.0/8, [::1]) that no CA is
//! given for; a registry whose certificate a private CA signed is trusted
//! as docker trusts it: the CA's `*.crt` files in
//! `/etc/docker/certs.d/HOST:PORT/`.

use std::io::Read;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::{Error, Result};

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Plain HTTP to any registry (not only this host's).
    pub insecure: bool,
    /// Where each registry's extra CA certificates are, in a directory
    /// named after it (`HOST:PORT/*.crt`); default `/etc/docker/certs.d`.
    pub certs_dir: Option<PathBuf>,
    /// The docker config file to take credentials from (skopeo's
    /// `--authfile`); default `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`.
    pub auth_file: Option<PathBuf>,
}

/// The `*.crt` files for `registry` under `certs_dir` (none: no such
/// directory).
fn extra_roots(certs_dir: &Path, registry: &str) -> Result<Vec<Certificate>> {
    let dir = certs_dir.join(registry);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir)(e)),
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            Ok(Certificate {
                encoding: CertificateEncoding::Pem,
                data: std::fs::read(&p).map_err(Error::io(&p))?,
            })
        })
        .collect()
}

pub struct Registry {
    rt: tokio::runtime::Runtime,
    client: Client,
    auth: RegistryAuth,
    reference: Reference,
}

/// Whether `registry` (host[:port]) is on this host.
fn is_local(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => registry.split(':').next().unwrap_or(""),
    };
    host == "localhost" || host.starts_with("127.") || host == "::1"
}

impl Registry {
    /// The repository `reference` names (a tag or a digest in it is what
    /// a push writes and a pull reads).
    pub fn connect(reference: &str, opts: &RegistryOptions) -> Result<Registry> {
        let parsed: Reference = reference.parse().map_err(|e: oci_client::ParseError| {
            Error::BadReference(reference.to_string(), e.to_string())
        })?;
        // reqwest's rustls asks for a process-wide crypto provider: ring,
        // which builds without aws-lc's C toolchain (rustls deprecates it
        // for lacking post-quantum key exchange, which registries do not
        // need yet).
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let _ = provider.install_default();
        let registry = parsed.resolve_registry().to_string();
        let certs_dir = opts
            .certs_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/docker/certs.d"));
        let roots = extra_roots(&certs_dir, &registry)?;
        // A registry on this host is plain HTTP unless a CA for it is
        // given (then it serves TLS).
        let protocol = if opts.insecure {
            ClientProtocol::Http
        } else if is_local(&registry) && roots.is_empty() {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            extra_root_certificates: roots,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(300)),
            ..ClientConfig::default()
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Registry {
                registry: registry.clone(),
                what: format!("starting its client: {e}"),
            })?;
        Ok(Registry {
            rt,
            client,
            auth: credentials(&registry, opts.auth_file.clone().or_else(docker_config))?,
            reference: parsed,
        })
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// `registry/repository`, as a blob's known places are written.
    pub fn repository(&self) -> String {
        format!(
            "{}/{}",
            self.reference.resolve_registry(),
            self.reference.repository()
        )
    }

    /// Asks the registry to link blob `digest` from `from` (another
    /// repository of the same registry, `registry/repository`) into this
    /// one, instead of uploading it again; whether it is here now.
    pub fn mount(&self, from: &str, digest: &str) -> Result<bool> {
        let Some(repo) = from
            .strip_prefix(self.reference.resolve_registry())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Ok(false);
        };
        if repo == self.reference.repository() {
            return Ok(false);
        }
        let Ok(source) = from.parse::<Reference>() else {
            return Ok(false);
        };
        // A registry may refuse a mount (no cross-repository links, no
        // rights on the source): the blob is uploaded then.
        let mounted = self
            .rt
            .block_on(self.client.mount_blob(&self.reference, &source, digest));
        Ok(mounted.is_ok() && self.blob_exists(digest)?)
    }

    fn err(&self, doing: &str) -> impl FnOnce(oci_client::errors::OciDistributionError) -> Error {
        let registry = self.reference.resolve_registry().to_string();
        let doing = doing.to_string();
        move |e| {
            // Each cause once (reqwest's outermost error says only
            // "error sending request"; the TLS or connection reason is
            // below it).
            let mut what = format!("{doing}: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                let text = c.to_string();
                if !what.contains(&text) {
                    what += &format!(": {text}");
                }
                cause = c.source();
            }
            Error::Registry { registry, what }
        }
    }

    pub fn blob_exists(&self, digest: &str) -> Result<bool> {
        self.rt
            .block_on(async {
                self.client
                    .auth(
                        &self.reference,
                        &self.auth,
                        oci_client::RegistryOperation::Push,
                    )
                    .await?;
                self.client.blob_exists(&self.reference, digest).await
            })
            .map_err(self.err(&format!("looking for blob {digest}")))
    }

    /// Uploads the `size` bytes `read` yields as blob `digest` (which the
    /// registry checks).
    pub fn push_blob(&self, digest: &str, size: u64, read: Box<dyn Read + Send>) -> Result<()> {
        // The reader is drained on the runtime's blocking pool, in 4 MiB
        // pieces: the upload streams, nothing is held whole in memory.
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(2);
        let mut read = read;
        let reader = self.rt.spawn_blocking(move || {
            let mut buf = vec![0u8; 4 << 20];
            loop {
                let mut n = 0;
                let res = loop {
                    match read.read(&mut buf[n..]) {
                        Ok(0) => break Ok(()),
                        Ok(k) => {
                            n += k;
                            if n == buf.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                match res {
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                    Ok(()) if n == 0 => return,
                    Ok(()) => {
                        if tx
                            .blocking_send(Ok(bytes::Bytes::copy_from_slice(&buf[..n])))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        let stream =
            tokio_stream_of(rx).map(|r| r.map_err(oci_client::errors::OciDistributionError::from));
        let pushed = self.rt.block_on(async {
            self.client
                .push_blob_stream(&self.reference, stream, digest, Some(size))
                .await
        });
        let _ = self.rt.block_on(reader);
        pushed
            .map(drop)
            .map_err(self.err(&format!("uploading blob {digest}")))
    }

    /// Uploads `manifest` under the reference's tag; its digest.
    pub fn push_manifest(&self, manifest: OciImageManifest) -> Result<String> {
        let m = OciManifest::Image(manifest);
        self.rt
            .block_on(self.client.push_manifest(&self.reference, &m))
            .map_err(self.err("uploading the manifest"))?;
        self.rt
            .block_on(
                self.client
                    .fetch_manifest_digest(&self.reference, &self.auth),
            )
            .map_err(self.err("reading back the manifest's digest"))
    }

    /// The image's manifest, its digest, and its config's bytes.
    pub fn manifest_and_config(&self) -> Result<(OciImageManifest, String, String)> {
        self.rt
            .block_on(
                self.client
                    .pull_manifest_and_config(&self.reference, &self.auth),
            )
            .map_err(self.err("reading the manifest"))
    }

    /// Downloads the blob `desc` names into `to` (a new file), checking
    /// its digest on the way.
    pub fn pull_blob(&self, desc: &OciDescriptor, to: &Path) -> Result<()> {
        let file = std::fs::File::create(to).map_err(Error::io(to))?;
        let out = tokio::fs::File::from_std(file);
        let got = self.rt.block_on(async {
            let mut out = out;
            self.client
                .pull_blob(&self.reference, desc, &mut out)
                .await?;
            tokio::io::AsyncWriteExt::flush(&mut out).await?;
            out.sync_all().await?;
            Ok::<_, oci_client::errors::OciDistributionError>(())
        });
        got.map_err(self.err(&format!("downloading blob {}", desc.digest)))
    }
}

/// A receiver as a stream.
fn tokio_stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// The docker config: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`, as docker and skopeo look for it.
fn docker_config() -> Option<std::path::PathBuf> {
    let dir = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".docker"),
    };
    Some(dir.join("config.json"))
}

/// What the docker config holds for `registry`; anonymous when there is
/// no config or it holds nothing for it.
fn credentials(registry: &str, config: Option<PathBuf>) -> Result<RegistryAuth> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let Some(path) = config else {
        return Ok(RegistryAuth::Anonymous);
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(Error::io(&path)(e)),
    };
    match docker_credential::get_credential_from_reader(std::io::BufReader::new(file), registry) {
        Ok(DockerCredential::UsernamePassword(u, p)) => Ok(RegistryAuth::Basic(u, p)),
        Ok(DockerCredential::IdentityToken(t)) => Ok(RegistryAuth::Bearer(t)),
        Err(E::NoCredentialConfigured | E::ConfigNotFound) => Ok(RegistryAuth::Anonymous),
        Err(e) => Err(Error::Registry {
            registry: registry.to_string(),
            what: format!("its credentials in {}: {e}", path.display()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_host_s_registries_go_without_tls_unless_asked() {
        for r in [
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(is_local(r), "{r}");
        }
        for r in [
            "registry.example:5000",
            "10.0.0.1:5000",
            "localhost.example.com",
        ] {
            assert!(!is_local(r), "{r}");
        }
    }

    #[test]
    fn a_bad_reference_is_refused_by_name() {
        let e = Registry::connect("UPPER/Case:tag:x", &RegistryOptions::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.starts_with("\"UPPER/Case:tag:x\" is not an image reference"),
            "{e}"
        );
    }
}
