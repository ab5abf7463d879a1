//! `flotilla demo`: the whole path on one machine with embedded defaults: certificates, a local fleet
//! repository from `examples/fleet`, the hub (embedded store), a simulator with the fleet's clusters, and one
//! agent per cluster; then a commit that propagates.

use crate::local::{commit_all, git, LocalFleet, Transport};
use crate::view;
use anyhow::{bail, Context};
use flotilla_proto::platform::v1::{ListClustersRequest, ListClustersResponse, RefreshRequest};
use std::time::Duration;

/// The example fleet, embedded so the demo runs from any directory.
const FLEET: &[(&str, &str)] = &[
    ("fleet.yaml", include_str!("../../examples/fleet/fleet.yaml")),
    ("rollout.yaml", include_str!("../../examples/fleet/rollout.yaml")),
    ("apps/shop/app.yaml", include_str!("../../examples/fleet/apps/shop/app.yaml")),
    ("apps/shop/base/kustomization.yaml", include_str!("../../examples/fleet/apps/shop/base/kustomization.yaml")),
    ("apps/shop/base/shop.yaml", include_str!("../../examples/fleet/apps/shop/base/shop.yaml")),
    (
        "apps/shop/overlays/staging/kustomization.yaml",
        include_str!("../../examples/fleet/apps/shop/overlays/staging/kustomization.yaml"),
    ),
    ("apps/monitoring/app.yaml", include_str!("../../examples/fleet/apps/monitoring/app.yaml")),
    ("apps/monitoring/agent.yaml", include_str!("../../examples/fleet/apps/monitoring/agent.yaml")),
    ("apps/eu-compliance/app.yaml", include_str!("../../examples/fleet/apps/eu-compliance/app.yaml")),
    ("apps/eu-compliance/residency.yaml", include_str!("../../examples/fleet/apps/eu-compliance/residency.yaml")),
    ("clusters/eu-1.yaml", include_str!("../../examples/fleet/clusters/eu-1.yaml")),
    ("clusters/eu-2.yaml", include_str!("../../examples/fleet/clusters/eu-2.yaml")),
    ("clusters/eu-3.yaml", include_str!("../../examples/fleet/clusters/eu-3.yaml")),
    ("clusters/eu-4.yaml", include_str!("../../examples/fleet/clusters/eu-4.yaml")),
    ("clusters/us-1.yaml", include_str!("../../examples/fleet/clusters/us-1.yaml")),
    ("clusters/us-2.yaml", include_str!("../../examples/fleet/clusters/us-2.yaml")),
    ("clusters/us-3.yaml", include_str!("../../examples/fleet/clusters/us-3.yaml")),
    ("clusters/us-4.yaml", include_str!("../../examples/fleet/clusters/us-4.yaml")),
    ("clusters/ap-1.yaml", include_str!("../../examples/fleet/clusters/ap-1.yaml")),
    ("clusters/ap-2.yaml", include_str!("../../examples/fleet/clusters/ap-2.yaml")),
    ("clusters/ap-3.yaml", include_str!("../../examples/fleet/clusters/ap-3.yaml")),
    ("clusters/ap-4.yaml", include_str!("../../examples/fleet/clusters/ap-4.yaml")),
];

/// Waits until every cluster runs `revision` with all apps in sync, printing the fleet view as it changes.
async fn converge(
    client: &mut flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient<
        tonic::transport::Channel,
    >,
    revision: &str,
    timeout: Duration,
) -> anyhow::Result<ListClustersResponse> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_shown = String::new();
    loop {
        let view = client
            .list_clusters(ListClustersRequest::default())
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        let table = view::render_clusters(&view, view::Output::Table)?;
        let summary: Vec<(String, u32, u32, String)> =
            view.clusters.iter().map(|c| (c.name.clone(), c.apps_in_sync, c.apps_total, c.revision.clone())).collect();
        let key = format!("{summary:?}");
        if key != last_shown {
            println!("{table}");
            last_shown = key;
        }
        let done = !view.clusters.is_empty()
            && view.clusters.iter().all(|c| c.revision == revision && c.apps_in_sync == c.apps_total && c.connected);
        if done {
            return Ok(view);
        }
        if tokio::time::Instant::now() > deadline {
            let behind: Vec<String> = view
                .clusters
                .iter()
                .filter(|c| c.revision != revision || c.apps_in_sync != c.apps_total)
                .map(|c| {
                    let why: Vec<String> = c
                        .apps
                        .iter()
                        .filter_map(|a| {
                            a.applied
                                .as_ref()
                                .filter(|s| !s.message.is_empty())
                                .map(|s| format!("{}: {}", a.app, s.message))
                        })
                        .collect();
                    format!(
                        "{} ({}/{} apps in sync{}{})",
                        c.name,
                        c.apps_in_sync,
                        c.apps_total,
                        if why.is_empty() { "" } else { "; " },
                        why.join("; ")
                    )
                })
                .collect();
            bail!("not every cluster runs {revision} after {}s: {}", timeout.as_secs(), behind.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(once: bool, timeout: Duration) -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("flotilla-demo-").tempdir().context("creating a work directory")?;
    let dir = work.path();
    println!("== work directory {}", dir.display());
    let clusters: Vec<String> = FLEET
        .iter()
        .filter_map(|(p, _)| p.strip_prefix("clusters/")?.strip_suffix(".yaml"))
        .map(str::to_string)
        .collect();

    println!("== fleet repository from examples/fleet");
    let repo = dir.join("fleet");
    for (path, content) in FLEET {
        let p = repo.join(path);
        std::fs::create_dir_all(p.parent().context("path")?)?;
        std::fs::write(&p, content)?;
    }
    git(&repo, &["init", "-q", "-b", "main"])?;
    let first = commit_all(&repo, "Fleet: shop 1.0, monitoring, EU data residency")?;

    println!(
        "== certificates (a fleet CA, the hub, {} clusters, operator admin), simulated clusters, hub, agents",
        clusters.len()
    );
    // Demo clusters run ReplicaSets and Pods, so `kubectl get pods` and `kubectl logs` show something to explore.
    let behaviour = flotilla_sim::Behaviour { ready_after_ms: 300, pods: true, ..Default::default() };
    let fleet = LocalFleet::start(dir, &repo, &clusters, behaviour, Duration::from_secs(5), Transport::Tcp).await?;
    let (hub_url, certs) = (fleet.hub_url.clone(), fleet.certs.clone());
    println!("== hub on {hub_url}; {} agents", clusters.len());
    let mut op = view::connect(&hub_url, "localhost", &certs, "admin").await?;
    println!("== waiting for every cluster to run {}", &first[..12]);
    let result = async {
        converge(&mut op, &first, timeout).await?;
        println!("== committing shop 1.1 and a new fleet-wide banner");
        let shop = repo.join("apps/shop/base/shop.yaml");
        std::fs::write(&shop, std::fs::read_to_string(&shop)?.replace("shop:1.0", "shop:1.1"))?;
        let defaults = repo.join("fleet.yaml");
        std::fs::write(
            &defaults,
            std::fs::read_to_string(&defaults)?.replace("banner: Welcome", "banner: Welcome back"),
        )?;
        let second = commit_all(&repo, "shop 1.1")?;
        op.refresh(RefreshRequest {}).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        println!("== waiting for every cluster to run {}", &second[..12]);
        converge(&mut op, &second, timeout).await?;
        println!("== every cluster runs {}", &second[..12]);
        anyhow::Ok(())
    }
    .await;
    if result.is_ok() && !once {
        println!("The fleet keeps running. Look around:");
        println!("  KUBECONFIG={}/kubeconfigs/eu-1.kubeconfig kubectl get all -n shop", dir.display());
        println!("  flotilla clusters --hub {hub_url} --certs {} --operator admin", certs.display());
        println!("Ctrl-C stops it.");
        let _ = tokio::signal::ctrl_c().await;
    }
    fleet.stop().await;
    result
}

#[cfg(test)]
mod tests {
    /// The embedded fleet is exactly examples/fleet.
    #[test]
    fn the_embedded_fleet_is_the_example() {
        let root: std::path::PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "examples", "fleet"].iter().collect();
        let on_disk = crate::render::read_checkout(&root).unwrap();
        let embedded: std::collections::BTreeMap<String, Vec<u8>> =
            super::FLEET.iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect();
        assert_eq!(on_disk.keys().collect::<Vec<_>>(), embedded.keys().collect::<Vec<_>>());
        assert_eq!(on_disk, embedded);
    }
}
