//! `flotilla-hub`: follows the fleet repository and serves agents and operators over mutual TLS.

use anyhow::Context;
use clap::Parser;
use flotilla_hub::git::{GitAuth, Secret};
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
    /// User name for HTTPS Git credentials (GitHub accepts any with a token; GitLab wants oauth2).
    #[arg(long, env = "FLOTILLA_GIT_USERNAME", default_value = "x-access-token")]
    git_username: String,
    /// File holding the HTTPS Git password or token (read at every fetch, so rotation needs no restart).
    #[arg(long, env = "FLOTILLA_GIT_PASSWORD_FILE", conflicts_with = "git_ssh_key")]
    git_password_file: Option<PathBuf>,
    /// The HTTPS Git password or token itself (prefer --git-password-file).
    #[arg(long = "git-password", env = "FLOTILLA_GIT_PASSWORD", hide_env_values = true, conflicts_with_all = ["git_password_file", "git_ssh_key"])]
    git_password: Option<String>,
    /// SSH private key for ssh:// or user@host:path repositories.
    #[arg(long, env = "FLOTILLA_GIT_SSH_KEY")]
    git_ssh_key: Option<PathBuf>,
    /// known_hosts file pinning the Git host's key; without it the key is trusted on first use and pinned.
    #[arg(long, env = "FLOTILLA_GIT_KNOWN_HOSTS", requires = "git_ssh_key")]
    git_known_hosts: Option<PathBuf>,
    /// Address for the Git webhook (POST /hooks/git, GitHub and GitLab push events); off when unset.
    #[arg(long, env = "FLOTILLA_HUB_WEBHOOK_LISTEN")]
    webhook_listen: Option<SocketAddr>,
    /// File holding the webhook secret (GitHub's signing secret, GitLab's token).
    #[arg(long, env = "FLOTILLA_HUB_WEBHOOK_SECRET_FILE", requires = "webhook_listen")]
    webhook_secret_file: Option<PathBuf>,
    /// Seconds after a start during which agents that have not reconnected yet count as online for rollouts
    /// (offline rules wait); default: the agents' reconnect backoff cap with its jitter, plus a margin.
    #[arg(long, env = "FLOTILLA_HUB_RESTART_GRACE_SECONDS", default_value_t = flotilla_hub::hub::DEFAULT_GRACE.as_secs())]
    restart_grace_seconds: u64,
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
    let auth = match (&args.git_ssh_key, &args.git_password_file, &args.git_password) {
        (Some(key), _, _) => GitAuth::Ssh { key_file: key.clone(), known_hosts: args.git_known_hosts.clone() },
        (None, Some(file), _) => {
            GitAuth::Basic { username: args.git_username.clone(), password: Secret::File(file.clone()) }
        }
        (None, None, Some(p)) => {
            GitAuth::Basic { username: args.git_username.clone(), password: Secret::Literal(p.clone()) }
        }
        (None, None, None) => GitAuth::None,
    };
    if let GitAuth::Basic { password, .. } = &auth {
        password.read().context("reading the Git password or token")?;
    }
    let webhook = args.webhook_listen.map(|addr| (addr, args.webhook_secret_file.clone().map(Secret::File)));
    if let Some((_, Some(secret))) = &webhook {
        secret.read().context("reading the webhook secret")?;
    }
    let shutdown = flotilla_common::process::shutdown_on_signal();
    let cfg = HubConfig {
        listen: args.listen,
        repo: args.repo,
        branch: args.branch,
        poll: Duration::from_secs(args.poll_seconds.max(1)),
        data_dir: args.data_dir,
        tls,
        auth,
        webhook,
        in_process: None,
        grace: Duration::from_secs(args.restart_grace_seconds),
    };
    run(cfg, shutdown, None).await
}
