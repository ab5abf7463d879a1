//! `flotilla-hub`: follows the fleet repository and serves agents and operators over mutual TLS.

use anyhow::Context;
use clap::Parser;
use flotilla_hub::server::{run, HubConfig, HubTls};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "flotilla-hub", version, about = "Flotilla hub")]
struct Args {
    /// Address for agents and the platform API.
    #[arg(long, env = "FLOTILLA_HUB_LISTEN", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Fleet repository URL (file://, git://, http(s)://).
    #[arg(long, env = "FLOTILLA_HUB_REPO")]
    repo: String,
    /// Branch to follow.
    #[arg(long, env = "FLOTILLA_HUB_BRANCH", default_value = "main")]
    branch: String,
    /// Seconds between fetches.
    #[arg(long, env = "FLOTILLA_HUB_POLL_SECONDS", default_value_t = 15)]
    poll_seconds: u64,
    /// Directory for the hub's store and its clone of the repository.
    #[arg(long, env = "FLOTILLA_HUB_DATA_DIR", default_value = "flotilla-hub-data")]
    data_dir: PathBuf,
    /// Directory with ca.pem, hub.pem and hub-key.pem (see `flotilla certs`).
    #[arg(long, env = "FLOTILLA_HUB_CERTS_DIR", default_value = "flotilla-certs")]
    certs: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flotilla_common::install_crypto_provider();
    flotilla_common::process::init_tracing();
    let args = Args::parse();
    let read = |f: &str| {
        let p = args.certs.join(f);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let tls = HubTls { ca_pem: read("ca.pem")?, cert_pem: read("hub.pem")?, key_pem: read("hub-key.pem")? };
    let shutdown = flotilla_common::process::shutdown_on_signal();
    let cfg = HubConfig {
        listen: args.listen,
        repo: args.repo,
        branch: args.branch,
        poll: Duration::from_secs(args.poll_seconds.max(1)),
        data_dir: args.data_dir,
        tls,
    };
    run(cfg, shutdown, None).await
}
