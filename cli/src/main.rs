//! `flotilla`: the operator's command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "flotilla", version, about = "GitOps fleet manager for many Kubernetes clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the fleet CA (unless DIR already has one) and certificates for the hub, clusters and operators.
    Certs(Certs),
}

#[derive(clap::Args, Debug)]
struct Certs {
    /// Directory for ca.pem, hub.pem, clusters/NAME.pem, operators/NAME.pem and their -key.pem files.
    #[arg(long, env = "FLOTILLA_CERTS_DIR", default_value = "flotilla-certs")]
    dir: PathBuf,
    /// Fleet name, recorded in the CA certificate.
    #[arg(long, env = "FLOTILLA_FLEET", default_value = "fleet")]
    fleet: String,
    /// DNS name or IP address the hub is reached at (repeatable or comma-separated).
    #[arg(long = "hub-host", env = "FLOTILLA_HUB_HOSTS", value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    hub_hosts: Vec<String>,
    /// A cluster to issue an agent certificate for (repeatable or comma-separated).
    #[arg(long = "cluster", env = "FLOTILLA_CLUSTERS", value_delimiter = ',')]
    clusters: Vec<String>,
    /// An operator to issue a platform API certificate for (repeatable or comma-separated).
    #[arg(long = "operator", env = "FLOTILLA_OPERATORS", value_delimiter = ',')]
    operators: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Certs(c) => {
            let files =
                flotilla_common::identity::write_fleet(&c.dir, &c.fleet, &c.hub_hosts, &c.clusters, &c.operators)?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(())
        }
    }
}
