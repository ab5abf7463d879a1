//! A whole fleet on this machine, in one process: certificates, simulated clusters, the hub (embedded store)
//! following a local Git repository, and one agent per cluster. The demo and the rehearsal run on it.

use anyhow::{bail, Context};
use flotilla_agent::apply::Applier;
use flotilla_agent::session::AgentConfig;
use flotilla_hub::server::{HubConfig, HubTls};
use flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Flotilla")
        .env("GIT_AUTHOR_EMAIL", "flotilla@flotilla.invalid")
        .env("GIT_COMMITTER_NAME", "Flotilla")
        .env("GIT_COMMITTER_EMAIL", "flotilla@flotilla.invalid")
        .output()
        .context("running git (install it with: apt-get install -y git)")?;
    if !out.status.success() {
        bail!("git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn commit_all(repo: &Path, msg: &str) -> anyhow::Result<String> {
    git(repo, &["add", "-A"])?;
    git(repo, &["commit", "-q", "--allow-empty", "-m", msg])?;
    git(repo, &["rev-parse", "HEAD"])
}

/// Replaces the repository's files with `tree` (everything but .git) and commits.
pub fn commit_tree(repo: &Path, tree: &flotilla_common::fleet::Tree, msg: &str) -> anyhow::Result<String> {
    for entry in std::fs::read_dir(repo)? {
        let entry = entry?;
        if entry.file_name() != ".git" {
            let p = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
    }
    for (path, content) in tree {
        let p = repo.join(path);
        std::fs::create_dir_all(p.parent().context("path")?)?;
        std::fs::write(&p, content)?;
    }
    commit_all(repo, msg)
}

pub struct LocalFleet {
    pub dir: PathBuf,
    pub certs: PathBuf,
    pub hub_url: String,
    pub sim: flotilla_sim::Simulator,
    shutdown: CancellationToken,
    hub: tokio::task::JoinHandle<anyhow::Result<()>>,
    agents: Vec<tokio::task::JoinHandle<()>>,
}

/// How a local fleet's agents reach their simulated clusters and the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Loopback TCP with TLS, as in a real fleet: four open files per cluster (both ends of the agent's
    /// connection to its API server and of its connection to the hub).
    Tcp,
    /// The same protocols over in-memory pipes (mutual TLS to the hub, HTTP/2 to the API server): no open
    /// file per cluster, for rehearsals of thousands of clusters.
    Memory,
}

/// Open files a local fleet needs besides its clusters' connections (the hub's store and Git, the
/// simulator's listener, the runtime).
const BASE_FILES: u64 = 512;
/// Open files per cluster over TCP.
const FILES_PER_CLUSTER: u64 = 4;

/// Raises this process's open-file limit to its hard limit; returns the limit now in force.
pub fn raise_open_files() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024),
    }
}

/// How many clusters fit over TCP with `limit` open files.
pub fn clusters_that_fit(limit: u64) -> u64 {
    limit.saturating_sub(BASE_FILES) / FILES_PER_CLUSTER
}

impl Transport {
    /// TCP when the open-file limit allows `clusters` over it, memory otherwise; says which and why.
    pub fn for_clusters(clusters: usize, limit: u64) -> Transport {
        let fit = clusters_that_fit(limit);
        if clusters as u64 <= fit {
            Transport::Tcp
        } else {
            println!(
                "{clusters} clusters over loopback TCP need about {} open files ({FILES_PER_CLUSTER} per cluster); this process may open {limit}, enough for {fit}: agents reach their clusters and the hub over in-memory pipes instead (the same TLS and HTTP/2)",
                clusters as u64 * FILES_PER_CLUSTER + BASE_FILES
            );
            Transport::Memory
        }
    }
}

impl LocalFleet {
    /// Starts everything for `clusters`, the hub following `repo` (a local Git repository, branch main).
    pub async fn start(
        dir: &Path,
        repo: &Path,
        clusters: &[String],
        behaviour: flotilla_sim::Behaviour,
        poll: Duration,
        transport: Transport,
    ) -> anyhow::Result<LocalFleet> {
        let limit = raise_open_files();
        if transport == Transport::Tcp && clusters.len() as u64 > clusters_that_fit(limit) {
            bail!(
                "{} clusters need about {} open files over TCP ({FILES_PER_CLUSTER} per cluster), and this process may open {limit}: at most {} clusters fit. Raise the hard limit (ulimit -Hn, or LimitNOFILE= under systemd) or use fewer clusters",
                clusters.len(),
                clusters.len() as u64 * FILES_PER_CLUSTER + BASE_FILES,
                clusters_that_fit(limit)
            );
        }
        let certs = dir.join("certs");
        flotilla_common::identity::write_fleet(
            &certs,
            "local",
            &["localhost".into(), "127.0.0.1".into()],
            clusters,
            &["admin".into()],
        )?;
        let sim_cfg =
            flotilla_sim::SimConfig { behaviour, ..flotilla_sim::SimConfig::with_clusters(clusters.to_vec()) };
        let sim = flotilla_sim::Simulator::start(sim_cfg).await?;
        sim.write_kubeconfigs(&dir.join("kubeconfigs"))?;
        let shutdown = CancellationToken::new();
        let read = |f: &str| std::fs::read_to_string(certs.join(f)).with_context(|| format!("reading {f}"));
        let tls = HubTls { ca_pem: read("ca.pem")?, cert_pem: read("hub.pem")?, key_pem: read("hub-key.pem")? };
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let (hub_tx, hub_rx) = match transport {
            Transport::Memory => {
                let (tx, rx) = tokio::sync::mpsc::channel(1024);
                (Some(flotilla_agent::session::InProcessHub(tx)), Some(rx))
            }
            Transport::Tcp => (None, None),
        };
        let hub_cfg = HubConfig {
            listen: "127.0.0.1:0".parse()?,
            repo: format!("file://{}", repo.display()),
            branch: "main".into(),
            poll,
            data_dir: dir.join("hub"),
            tls,
            auth: flotilla_hub::git::GitAuth::None,
            webhook: None,
            in_process: hub_rx,
            grace: flotilla_hub::hub::DEFAULT_GRACE,
            store: Default::default(),
            advertise: None,
            metrics: None,
            traces: None,
            identities: Default::default(),
            bootstrap: None,
            signer: None,
            certs_dir: None,
        };
        let hub = tokio::spawn(flotilla_hub::server::run(hub_cfg, shutdown.clone(), Some(bound_tx)));
        let addr = bound_rx.await.context("the hub did not start")?;
        let hub_url = format!("https://localhost:{}", addr.port());
        // Agents start a few dozen at a time: each reads its state from its cluster first.
        let start_agent = |c: String| {
            let (sim_inner, hub_url, hub_tx, shutdown) =
                (sim.inner().clone(), hub_url.clone(), hub_tx.clone(), shutdown.clone());
            let kubeconfig = sim.kubeconfig(&c);
            let files = (read("ca.pem"), read(&format!("clusters/{c}.pem")), read(&format!("clusters/{c}-key.pem")));
            async move {
                let client = match transport {
                    Transport::Tcp => {
                        let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig)?;
                        flotilla_agent::kube_client::client(
                            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
                        )?
                    }
                    Transport::Memory => {
                        let name = c.clone();
                        flotilla_agent::kube_client::in_process(std::sync::Arc::new(move || {
                            sim_inner.connect_in_process(&name)
                        }))?
                    }
                };
                let cfg = AgentConfig {
                    hub: hub_url,
                    hub_name: Some("localhost".into()),
                    ca_pem: files.0?,
                    cert_pem: files.1?,
                    key_pem: files.2?,
                    in_process: hub_tx,
                    credentials: None,
                };
                let engine = flotilla_agent::engine::start(
                    std::sync::Arc::new(Applier::new(client)),
                    Default::default(),
                    shutdown.clone(),
                )
                .await
                .with_context(|| format!("starting the agent of {c}"))?;
                anyhow::Ok(tokio::spawn(flotilla_agent::session::run(cfg, engine, shutdown)))
            }
        };
        use futures::StreamExt;
        let started: Vec<anyhow::Result<_>> =
            futures::stream::iter(clusters.iter().cloned().map(start_agent)).buffer_unordered(32).collect().await;
        let agents = started.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        Ok(LocalFleet { dir: dir.to_path_buf(), certs, hub_url, sim, shutdown, hub, agents })
    }

    pub async fn operator(&self) -> anyhow::Result<PlatformServiceClient<Channel>> {
        crate::view::connect(&self.hub_url, "localhost", &self.certs, "admin").await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for a in self.agents {
            let _ = a.await;
        }
        let _ = self.hub.await;
        self.sim.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_is_chosen_only_when_the_open_file_limit_allows_it() {
        assert_eq!(clusters_that_fit(20_000), 4_872);
        assert_eq!(clusters_that_fit(100), 0);
        assert_eq!(Transport::for_clusters(1_000, 20_000), Transport::Tcp);
        assert_eq!(Transport::for_clusters(4_872, 20_000), Transport::Tcp);
        assert_eq!(Transport::for_clusters(4_873, 20_000), Transport::Memory);
        assert_eq!(Transport::for_clusters(10_000, 20_000), Transport::Memory);
    }
}
