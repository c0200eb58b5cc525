//! Kubernetes' path to vmctl VMs, as kubelet drives it: containerd's CRI
//! plugin with the runtime handler `vmctl` (what a RuntimeClass names),
//! called over its socket by this test's own CRI client (k8s-cri's
//! generated runtime.v1 API, as kubelet speaks it): PullImage,
//! RunPodSandbox (a host-network pod: no CNI is configured here),
//! CreateContainer, StartContainer, ContainerStatus until the guest's
//! exit, the console in the container's log, ContainerStats, StopContainer
//! of a VM that runs on, RemoveContainer, StopPodSandbox,
//! RemovePodSandbox; nothing of the pod left behind.

use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use test_infra::containerd::HANDLER;
use test_infra::{ready, Fixture, LocalContainerd, LocalRegistry, Patience, Vmctl, START_MARKER};
use tonic::transport::{Channel, Endpoint, Uri};

async fn channel(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    Endpoint::try_from("http://[::]")
        .expect("an endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("the CRI socket")
}

/// Until `f` holds, polling the CRI (each call well under a second).
async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let p = Patience::new(what, Duration::from_secs(1));
    let start = std::time::Instant::now();
    while !f().await {
        assert!(!p.expired(start), "{}", p.explain(start.elapsed()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn container(name: &str, image: &str, args: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        args: args.iter().map(|a| a.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

#[test]
fn kubelet_s_cri_calls_run_vms_under_the_vmctl_runtime_handler() {
    if !ready("cri", &["containerd", "docker-registry", "umoci", "skopeo"]) {
        return;
    }
    let fx = Fixture::new();
    let reg = LocalRegistry::start(&fx.path("")).expect("registry");
    let (base, _) = fx.golden_base();
    let reference = format!("{}/vms/base:golden", reg.address);
    Vmctl::at(fx.path("builder")).ok(&[
        "image",
        "push",
        base.to_str().unwrap(),
        &reference,
        "--cmdline",
        "mode=read verify=1 expect_gen=7 size=8M",
        "--memory",
        "64M",
    ]);
    // The pod's sandbox image: an ordinary container image (kubelet's
    // pause), which the shim runs as no VM.
    let pause = reg
        .push_container_image(&fx.path(""), "pause:1")
        .expect("the pause image");
    let host = Vmctl::at(fx.path("node"));
    let c = LocalContainerd::start(
        &fx.path("containerd"),
        &fx.path("node"),
        Some((&reg.address, &pause)),
    )
    .expect("containerd with the CRI plugin");
    let logs = fx.path("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = channel(&c.socket).await;
        let mut runtime = RuntimeServiceClient::new(ch.clone());
        let mut images = ImageServiceClient::new(ch);
        let v = runtime
            .version(VersionRequest::default())
            .await
            .expect("Version")
            .into_inner();
        assert_eq!(v.runtime_name, "containerd");

        images
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: reference.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("PullImage");

        let sandbox_config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "fleet".into(),
                uid: "uid-fleet-1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            log_directory: logs.to_string_lossy().into_owned(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod = runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: HANDLER.into(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        assert!(
            host.json(&["list"]).as_array().unwrap().is_empty(),
            "the sandbox is no VM"
        );

        // A VM that reads the base's data back and ends: EXITED, 0, its
        // console in the container's log.
        let reader = runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container("reader", &reference, &[])),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        runtime
            .start_container(StartContainerRequest {
                container_id: reader.clone(),
            })
            .await
            .expect("StartContainer");
        let status_client = runtime.clone();
        let status_of = |id: String| {
            let mut runtime = status_client.clone();
            async move {
                runtime
                    .container_status(ContainerStatusRequest {
                        container_id: id,
                        verbose: false,
                    })
                    .await
                    .expect("ContainerStatus")
                    .into_inner()
                    .status
                    .expect("a status")
            }
        };
        until("the reader VM exited", || {
            let s = status_of(reader.clone());
            async move { s.await.state == ContainerState::ContainerExited as i32 }
        })
        .await;
        let st = status_of(reader.clone()).await;
        assert_eq!(st.exit_code, 0, "{st:?}");
        let log = std::fs::read_to_string(logs.join("reader.log")).expect("the container's log");
        assert!(
            log.contains(START_MARKER) && log.contains("\"result\":\"ok\""),
            "{log}"
        );

        // A VM that runs on: RUNNING, measured, stopped by StopContainer
        // (the graceful stop, then kubelet's SIGKILL after the grace).
        let idle = runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container("idle", &reference, &["mode=idle"])),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        runtime
            .start_container(StartContainerRequest {
                container_id: idle.clone(),
            })
            .await
            .expect("StartContainer");
        let st = status_of(idle.clone()).await;
        assert_eq!(st.state, ContainerState::ContainerRunning as i32, "{st:?}");
        // (The reader's task went when it exited, and its VM with it.)
        assert_eq!(host.json(&["list"]).as_array().unwrap().len(), 1);
        let stats = runtime
            .container_stats(ContainerStatsRequest {
                container_id: idle.clone(),
            })
            .await
            .expect("ContainerStats")
            .into_inner()
            .stats
            .expect("stats");
        let rss = stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .map_or(0, |v| v.value);
        assert!(rss > 1 << 20, "{stats:?}");
        runtime
            .stop_container(StopContainerRequest {
                container_id: idle.clone(),
                timeout: 30,
            })
            .await
            .expect("StopContainer");
        let st = status_of(idle.clone()).await;
        assert_eq!(st.state, ContainerState::ContainerExited as i32, "{st:?}");

        for id in [reader, idle] {
            runtime
                .remove_container(RemoveContainerRequest { container_id: id })
                .await
                .expect("RemoveContainer");
        }
        runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .expect("StopPodSandbox");
        runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await
            .expect("RemovePodSandbox");
    });
    assert!(host.json(&["list"]).as_array().unwrap().is_empty());
    Patience::new("the pod's shims gone", Duration::from_secs(1))
        .wait_until(|| Ok(c.shims().is_empty()))
        .unwrap_or_else(|e| panic!("{e}"));
}
