//! `flotilla rehearse`: a rollout of a real fleet repository against N simulated clusters, with its
//! timeline. The simulated clusters take the repository's inventory labels in turn (cluster i gets the labels
//! of inventory cluster i mod M), so the waves select them as they would the real ones.

use crate::local::{commit_tree, git, LocalFleet, Transport};
use anyhow::{bail, Context};
use flotilla_common::fleet::Tree;
use flotilla_proto::platform::v1::{ListRolloutsRequest, RefreshRequest};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Options {
    pub clusters: usize,
    /// Rehearse the change FROM → TO (revisions of the repository); without FROM, rolling TO out to an empty
    /// fleet.
    pub from: Option<String>,
    pub to: String,
    /// Simulated failure: containers whose image matches never become ready.
    pub fail_images: Option<String>,
    pub timeout: Duration,
    /// How agents reach clusters and the hub; `None` picks by the open-file limit.
    pub transport: Option<Transport>,
}

/// The repository's tree at `rev`, its inventory replaced by `n` simulated clusters with its labels in turn.
fn simulated(repo: &Path, rev: &str, n: usize) -> anyhow::Result<(Tree, Vec<String>)> {
    let snap = flotilla_hub::git::snapshot_at(repo, rev)?;
    let fleet = flotilla_common::fleet::parse(&snap.tree);
    let inventory: Vec<_> = fleet.clusters.iter().collect();
    if inventory.is_empty() {
        bail!("{rev} has no clusters/ inventory to take labels from");
    }
    let mut tree: Tree = snap.tree.into_iter().filter(|(p, _)| !p.starts_with("clusters/")).collect();
    let width = n.to_string().len().max(2);
    let mut names = Vec::new();
    for i in 0..n {
        let (orig, spec) = inventory[i % inventory.len()];
        let name = format!("sim-{:0width$}", i + 1);
        let mut spec = spec.clone();
        spec.labels.insert("rehearsal-of".into(), orig.clone());
        tree.insert(format!("clusters/{name}.yaml"), serde_yaml::to_string(&spec)?.into_bytes());
        names.push(name);
    }
    Ok((tree, names))
}

pub async fn run(repo: &Path, o: Options) -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("flotilla-rehearsal-").tempdir()?;
    let dir = work.path();
    let local_repo = dir.join("fleet");
    std::fs::create_dir_all(&local_repo)?;
    git(&local_repo, &["init", "-q", "-b", "main"])?;
    let (to_tree, clusters) = simulated(repo, &o.to, o.clusters)?;
    let behaviour = flotilla_sim::Behaviour {
        ready_after_ms: 300,
        fail_images: o.fail_images.clone(),
        progress_deadline_cap_s: Some(10),
        ..Default::default()
    };
    let start_rev = match &o.from {
        Some(from) => {
            let (tree, _) = simulated(repo, from, o.clusters)?;
            Some(commit_tree(&local_repo, &tree, &format!("rehearsal: {from}"))?)
        }
        None => {
            // An empty fleet: the inventory only, so TO's apps roll out from nothing.
            let inventory: Tree = to_tree
                .iter()
                .filter(|(p, _)| p.starts_with("clusters/"))
                .map(|(p, c)| (p.clone(), c.clone()))
                .collect();
            commit_tree(&local_repo, &inventory, "rehearsal: empty fleet")?;
            None
        }
    };
    println!(
        "rehearsal: {} simulated clusters (labels from {}'s inventory), work directory {}",
        clusters.len(),
        o.to,
        dir.display()
    );
    let transport = match o.transport {
        Some(t) => t,
        None => Transport::for_clusters(clusters.len(), crate::local::raise_open_files()),
    };
    let fleet = LocalFleet::start(dir, &local_repo, &clusters, behaviour, Duration::from_secs(1), transport).await?;
    let mut op = fleet.operator().await?;
    let result = async {
        if start_rev.is_some() {
            println!("waiting for the fleet to run {}", o.from.as_deref().unwrap_or_default());
            wait_settled(&mut op, None, o.timeout, false).await?;
        }
        let started = Instant::now();
        let to_rev = commit_tree(&local_repo, &to_tree, &format!("rehearsal: {}", o.to))?;
        op.refresh(RefreshRequest {}).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        println!("rolling out {} ({})", o.to, &to_rev[..12]);
        let outcome = wait_settled(&mut op, Some(&to_rev), o.timeout, true).await?;
        println!("rehearsal finished after {:.1} s:", started.elapsed().as_secs_f64());
        for (app, phase) in outcome {
            println!("  {app}: {phase}");
        }
        anyhow::Ok(())
    }
    .await;
    fleet.stop().await;
    result
}

/// Waits until no rollout of `revision` (any revision when None) progresses; prints timelines as they grow.
async fn wait_settled(
    op: &mut flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient<tonic::transport::Channel>,
    revision: Option<&str>,
    timeout: Duration,
    print: bool,
) -> anyhow::Result<BTreeMap<String, String>> {
    let deadline = Instant::now() + timeout;
    let mut shown: BTreeSet<(String, String)> = BTreeSet::new();
    let mut seen_any = false;
    loop {
        let list = op
            .list_rollouts(ListRolloutsRequest::default())
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        let relevant: Vec<_> = list.rollouts.iter().filter(|r| revision.is_none_or(|rev| r.revision == rev)).collect();
        if print {
            for r in &relevant {
                // The rehearsed rollout's events: from its start on.
                let start = revision.map(|rev| format!("rollout of {} started", rev.get(..12).unwrap_or(rev)));
                let from =
                    start.as_ref().and_then(|s| r.timeline.iter().rposition(|l| l.contains(s.as_str()))).unwrap_or(0);
                for line in &r.timeline[from..] {
                    if shown.insert((r.app.clone(), line.clone())) {
                        println!("  {:<16} {line}", r.app);
                    }
                }
            }
        }
        seen_any |= !relevant.is_empty();
        let moving = relevant.iter().any(|r| r.phase == "progressing" || r.phase == "paused");
        let waiting_approval = relevant.iter().any(|r| r.waves.iter().any(|w| w.phase == "awaiting approval"));
        if seen_any && !moving {
            return Ok(relevant.iter().map(|r| (r.app.clone(), r.phase.clone())).collect());
        }
        if waiting_approval && print {
            // A rehearsal approves what a person would: say so, and go on.
            for r in &relevant {
                for w in r.waves.iter().filter(|w| w.phase == "awaiting approval") {
                    println!("  {:<16} (rehearsal) approving wave {}", r.app, w.name);
                    op.control_rollout(flotilla_proto::platform::v1::ControlRolloutRequest {
                        app: r.app.clone(),
                        action: flotilla_proto::platform::v1::control_rollout_request::Action::Approve as i32,
                        wave: w.name.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("{}", s.message()))
                    .context("approving")?;
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the rollout did not settle within {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
