//! `flotilla-sim`: serve N simulated Kubernetes clusters and write a kubeconfig for each.

use anyhow::Context;
use clap::Parser;
use flotilla_sim::{Behaviour, SimConfig, Simulator};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "flotilla-sim",
    version,
    about = "Many simulated Kubernetes clusters in one process, served through the Kubernetes API"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "FLOTILLA_SIM_LISTEN", default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Number of clusters to create, named PREFIX01, PREFIX02, ...
    #[arg(long, env = "FLOTILLA_SIM_CLUSTERS", default_value_t = 0)]
    clusters: usize,
    /// Name prefix for numbered clusters.
    #[arg(long, env = "FLOTILLA_SIM_NAME_PREFIX", default_value = "sim-")]
    name_prefix: String,
    /// A cluster by name (repeatable), in addition to the numbered ones.
    #[arg(long = "cluster", env = "FLOTILLA_SIM_CLUSTER_NAMES", value_delimiter = ',')]
    names: Vec<String>,
    /// Directory for DIR/<cluster>.kubeconfig files, plus DIR/server with the base URL.
    #[arg(long, env = "FLOTILLA_SIM_KUBECONFIG_DIR")]
    kubeconfig_dir: Option<PathBuf>,
    /// Time for workloads to become ready, in milliseconds.
    #[arg(long, env = "FLOTILLA_SIM_READY_AFTER_MS", default_value_t = 500)]
    ready_after_ms: u64,
    /// Time for Jobs to finish, in milliseconds.
    #[arg(long, env = "FLOTILLA_SIM_JOB_AFTER_MS", default_value_t = 1000)]
    job_after_ms: u64,
    /// Images matching this regular expression never become ready.
    #[arg(long, env = "FLOTILLA_SIM_FAIL_IMAGES")]
    fail_images: Option<String>,
    /// Cap on every Deployment's progressDeadlineSeconds.
    #[arg(long, env = "FLOTILLA_SIM_PROGRESS_DEADLINE_CAP_S")]
    progress_deadline_cap_s: Option<u64>,
    /// Nodes per cluster (DaemonSet scheduling).
    #[arg(long, env = "FLOTILLA_SIM_NODES", default_value_t = 1)]
    nodes: u32,
    /// Events kept per cluster for resuming watches.
    #[arg(long, env = "FLOTILLA_SIM_HISTORY", default_value_t = 1024)]
    history: usize,
    /// Interval between watch bookmarks, in milliseconds.
    #[arg(long, env = "FLOTILLA_SIM_BOOKMARK_MS", default_value_t = 5000)]
    bookmark_ms: u64,
    /// Kubeconfigs point at plain HTTP under /clusters/NAME instead of HTTPS (HTTPS is served either way).
    #[arg(long, env = "FLOTILLA_SIM_PLAIN_HTTP")]
    plain_http: bool,
    /// Log format: plain or json.
    #[arg(long, env = "FLOTILLA_SIM_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_format == "json" {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let mut clusters = SimConfig::numbered(&args.name_prefix, args.clusters);
    clusters.extend(args.names.iter().filter(|n| !n.is_empty()).cloned());
    let cfg = SimConfig {
        listen: args.listen,
        clusters,
        behaviour: Behaviour {
            ready_after_ms: args.ready_after_ms,
            job_after_ms: args.job_after_ms,
            fail_images: args.fail_images,
            progress_deadline_cap_s: args.progress_deadline_cap_s,
            nodes: args.nodes,
            ..Behaviour::default()
        },
        history: args.history,
        bookmark_interval: Duration::from_millis(args.bookmark_ms.max(10)),
        tls: !args.plain_http,
    };
    let sim = Simulator::start(cfg).await.context("starting the simulator")?;
    if let Some(dir) = &args.kubeconfig_dir {
        let files = sim.write_kubeconfigs(dir)?;
        std::fs::write(dir.join("server"), format!("http://{}\n", sim.addr())).context("writing DIR/server")?;
        std::fs::write(dir.join("ca.pem"), sim.ca_pem()).context("writing DIR/ca.pem")?;
        println!(
            "flotilla-sim: {} clusters on https://{} and http://{}; kubeconfigs in {}",
            files.len(),
            sim.addr(),
            sim.addr(),
            dir.display()
        );
    } else {
        println!(
            "flotilla-sim: {} clusters on https://{} and http://{}",
            sim.cluster_names().len(),
            sim.addr(),
            sim.addr()
        );
    }
    println!("admin API: {}/clusters", sim.admin_url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    sim.shutdown().await;
    Ok(())
}
