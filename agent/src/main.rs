//! `flotilla-agent`: the agent of one cluster.

use anyhow::Context;
use clap::Parser;
use flotilla_agent::apply::Applier;
use flotilla_agent::session::{run, AgentConfig};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "flotilla-agent", version, about = "Flotilla agent")]
struct Args {
    /// The hub, https://HOST:PORT.
    #[arg(long, env = "FLOTILLA_AGENT_HUB")]
    hub: String,
    /// The name in the hub's certificate, when the URL's host is not it.
    #[arg(long, env = "FLOTILLA_AGENT_HUB_NAME")]
    hub_name: Option<String>,
    /// The fleet CA certificate.
    #[arg(long, env = "FLOTILLA_AGENT_CA")]
    ca: PathBuf,
    /// This cluster's certificate (its name is the cluster's identity).
    #[arg(long, env = "FLOTILLA_AGENT_CERT")]
    cert: PathBuf,
    #[arg(long, env = "FLOTILLA_AGENT_KEY")]
    key: PathBuf,
    /// Kubeconfig of the cluster; without it, KUBECONFIG or the in-cluster configuration.
    #[arg(long, env = "FLOTILLA_AGENT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flotilla_common::install_crypto_provider();
    flotilla_common::process::init_tracing();
    let args = Args::parse();
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let cfg = AgentConfig {
        hub: args.hub,
        hub_name: args.hub_name,
        ca_pem: read(&args.ca)?,
        cert_pem: read(&args.cert)?,
        key_pem: read(&args.key)?,
    };
    let kube_cfg = match &args.kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("reading kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(kube_cfg)?;
    let shutdown = flotilla_common::process::shutdown_on_signal();
    run(cfg, Applier::new(client), shutdown).await;
    Ok(())
}
