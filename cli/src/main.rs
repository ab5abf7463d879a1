//! `flotilla`: the operator's command line.

use clap::{Parser, Subcommand};
use flotilla_cli::view::{self, Output};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "flotilla", version, about = "GitOps fleet manager for many Kubernetes clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct HubFlags {
    /// The hub, https://HOST:PORT.
    #[arg(long, env = "FLOTILLA_HUB", default_value = "https://localhost:7443")]
    hub: String,
    /// The name in the hub's certificate.
    #[arg(long, env = "FLOTILLA_HUB_NAME", default_value = "localhost")]
    hub_name: String,
    /// Directory made by `flotilla certs`.
    #[arg(long, env = "FLOTILLA_CERTS_DIR", default_value = "flotilla-certs")]
    certs: PathBuf,
    /// Operator whose certificate (CERTS/operators/NAME.pem) authenticates the call.
    #[arg(long, env = "FLOTILLA_OPERATOR", default_value = "admin")]
    operator: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the fleet CA (unless DIR already has one) and certificates for the hub, clusters and operators.
    Certs(Certs),
    /// Every cluster: connected, revision, apps in sync, held back and broken, last seen, problems.
    Clusters {
        /// Only clusters whose labels match (`tier=prod,region in (eu,us),!canary`).
        #[arg(short = 'l', long, default_value = "")]
        selector: String,
        /// Only clusters with a problem: disconnected, an app broken, failed or not in sync.
        #[arg(long)]
        problems: bool,
        #[command(flatten)]
        hub: HubFlags,
    },
    /// The hub's replicas: which one leads since when, and each one's agent sessions.
    Hubs {
        #[command(flatten)]
        hub: HubFlags,
    },
    /// Run the whole path on this machine: certificates, a fleet repository, the hub, simulated clusters and
    /// their agents; then commit a change and watch it propagate.
    Demo {
        /// Exit 0 once every cluster runs the second commit, non-zero with the reason otherwise.
        #[arg(long)]
        once: bool,
        /// Seconds to wait for each commit to reach every cluster.
        #[arg(long, default_value_t = 120)]
        timeout_seconds: u64,
    },
    /// Print what a cluster would receive from a fleet repository checkout (or one revision of a repository),
    /// offline.
    Render {
        /// The checkout (a directory with clusters/ and apps/), or with --rev any repository, bare or not.
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// Render this revision (commit, branch, tag) as Git holds it, rather than the files of the checkout.
        #[arg(long)]
        rev: Option<String>,
        /// The cluster.
        #[arg(long)]
        cluster: String,
        /// Only this app.
        #[arg(long)]
        app: Option<String>,
    },
    /// Which clusters and apps change between two revisions of a fleet repository, offline: the blast radius
    /// of a pull request before it merges. Exits 1 when the newer revision fails to render anywhere or has
    /// files that cannot be read.
    Diff {
        /// The repository (a checkout or a bare repository).
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// The older revision (commit, branch, tag).
        from: String,
        /// The newer revision.
        to: String,
        /// Print a unified diff of the rendered objects for each change.
        #[arg(short = 'p', long)]
        patch: bool,
        /// Output format (table or json).
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Rollouts: status, and the controls (pause, resume, approve, abort, retry, rollback).
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Rehearse a rollout of a fleet repository against N simulated clusters (on this machine) and print its
    /// timeline. Waves needing approval are approved as they come.
    Rehearse {
        /// The repository (a checkout or bare repository).
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// Simulated clusters; they take the inventory's labels in turn.
        #[arg(long, default_value_t = 50)]
        clusters: usize,
        /// Rehearse the change from this revision (default: rolling TO out to an empty fleet).
        #[arg(long)]
        from: Option<String>,
        /// The revision to roll out.
        #[arg(long, default_value = "HEAD")]
        to: String,
        /// Simulated failure: containers whose image matches this regular expression never become ready.
        #[arg(long)]
        fail_images: Option<String>,
        #[arg(long, default_value_t = 600)]
        timeout_seconds: u64,
        /// How agents reach their clusters and the hub: tcp (loopback TLS, 4 open files per cluster),
        /// memory (in-memory pipes, the same protocols), or auto (tcp when the open-file limit allows it).
        #[arg(long, default_value = "auto", value_parser = ["auto", "tcp", "memory"])]
        transport: String,
    },
    /// Why a cluster is or is not on the newest revision of its apps.
    Explain {
        cluster: String,
        app: Option<String>,
        #[command(flatten)]
        hub: HubFlags,
    },
    /// One cluster with its apps.
    Cluster {
        name: String,
        #[command(flatten)]
        hub: HubFlags,
    },
    /// The audit trail: every mutating call and every refusal (who, what, when, the answer), oldest first.
    Audit {
        /// Only records since this long ago (30m, 2h, 7d) or this time (2026-12-07T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Only this operator's records.
        #[arg(long)]
        who: Option<String>,
        /// At most this many, the newest.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[command(flatten)]
        hub: HubFlags,
    },
    /// Bootstrap tokens with which a cluster's agent joins the fleet (admin).
    JoinToken {
        #[command(subcommand)]
        command: JoinTokenCommand,
    },
    /// Who the hub takes this operator certificate for, its role, and when the certificate expires.
    Whoami {
        #[command(flatten)]
        hub: HubFlags,
    },
}

#[derive(Subcommand, Debug)]
enum JoinTokenCommand {
    /// A short-lived, limited-use token for CLUSTER's agent (`flotilla-agent --bootstrap-token`): it joins once
    /// the token is valid and the cluster is in the inventory. Printed once; the hub keeps only its hash.
    Create {
        cluster: String,
        /// How long the token is valid (at most 7 days).
        #[arg(long, default_value = "1h", value_parser = flotilla_common::identity::parse_ttl)]
        ttl: std::time::Duration,
        /// How many joins it allows.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        #[command(flatten)]
        hub: HubFlags,
    },
}

#[derive(Subcommand, Debug)]
enum RolloutCommand {
    /// Each wave with its progress, counts, timers and why it waits.
    Status {
        app: Option<String>,
        /// Refresh every 2 s until Ctrl-C.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        hub: HubFlags,
    },
    /// No new releases until resumed.
    Pause {
        app: String,
        #[command(flatten)]
        hub: HubFlags,
    },
    Resume {
        app: String,
        #[command(flatten)]
        hub: HubFlags,
    },
    /// Let a wave that needs approval start.
    Approve {
        app: String,
        wave: String,
        #[command(flatten)]
        hub: HubFlags,
    },
    /// Stop the rollout where it is.
    Abort {
        app: String,
        #[command(flatten)]
        hub: HubFlags,
    },
    /// Start a failed, aborted or rolled-back rollout's content again, through the waves (a commit that
    /// leaves that content unchanged never does).
    Retry {
        app: String,
        #[command(flatten)]
        hub: HubFlags,
    },
    /// Go back to a revision the hub rendered: through the waves, or with --now on every cluster at once.
    Rollback {
        app: String,
        revision: String,
        #[arg(long)]
        now: bool,
        #[command(flatten)]
        hub: HubFlags,
    },
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
    /// How long the certificates issued now are valid (12h, 30d, 1y); the CA is not reissued.
    #[arg(long, env = "FLOTILLA_CERT_TTL", default_value = "365d", value_parser = flotilla_common::identity::parse_ttl)]
    ttl: std::time::Duration,
}

fn main() -> std::process::ExitCode {
    flotilla_common::install_crypto_provider();
    let cli = Cli::parse();
    // Output into a closed pipe (`flotilla render … | head`) ends the process quietly, as for other tools.
    // Not for the commands that run a whole fleet in this process: their child processes' pipes must fail
    // with an error, not end everything.
    if !matches!(cli.command, Command::Demo { .. } | Command::Rehearse { .. }) {
        sigpipe::reset();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A user's error: its message and causes, never a stack trace.
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Certs(c) => {
            let files = flotilla_common::identity::write_fleet_for(
                &c.dir,
                &c.fleet,
                &c.hub_hosts,
                &c.clusters,
                &c.operators,
                Some(c.ttl),
            )?;
            for f in files {
                println!("{}", f.display());
            }
            let until = chrono::Utc::now() + chrono::Duration::seconds(c.ttl.as_secs() as i64);
            eprintln!("certificates valid until {}", until.format("%Y-%m-%d %H:%M UTC"));
            Ok(())
        }
        Command::Demo { once, timeout_seconds } => {
            flotilla_cli::demo::run(once, std::time::Duration::from_secs(timeout_seconds)).await
        }
        Command::Render { repo, rev, cluster, app } => {
            let tree = match rev {
                Some(rev) => flotilla_hub::git::snapshot_at(&repo, &rev)?.tree,
                None => flotilla_cli::render::read_checkout(&repo)?,
            };
            let tools = flotilla_common::tools::SystemTools::detect();
            print!("{}", flotilla_cli::render::render(&tree, &cluster, app.as_deref(), &tools)?);
            Ok(())
        }
        Command::Diff { repo, from, to, patch, output } => {
            use flotilla_cli::render::{blast_radius, format_blast_radius, Revision};
            let a = flotilla_hub::git::snapshot_at(&repo, &from)?;
            let b = flotilla_hub::git::snapshot_at(&repo, &to)?;
            let tools = flotilla_common::tools::SystemTools::detect();
            let r = blast_radius(
                Revision { name: &from, commit: &a.revision, tree: &a.tree },
                Revision { name: &to, commit: &b.revision, tree: &b.tree },
                patch,
                &tools,
            )?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                Output::Yaml => print!("{}", serde_yaml::to_string(&r)?),
                Output::Table => print!("{}", format_blast_radius(&r)),
            }
            let failing: usize = r.changes.iter().filter(|c| c.change == "error").map(|c| c.clusters.len()).sum();
            if failing > 0 {
                anyhow::bail!("{failing} cluster apps fail to render at {to}");
            }
            if r.broken_files > 0 {
                anyhow::bail!("{} files of the fleet cannot be read at {to}", r.broken_files);
            }
            Ok(())
        }
        Command::Hubs { hub: h } => {
            let mut client = view::connect(&h.hub, &h.hub_name, &h.certs, &h.operator).await?;
            view::hubs(&mut client, h.output).await
        }
        Command::Clusters { selector, problems, hub: h } => {
            let mut client = view::connect(&h.hub, &h.hub_name, &h.certs, &h.operator).await?;
            view::clusters(&mut client, h.output, &selector, problems).await
        }
        Command::Rollout { command } => {
            use flotilla_cli::rollout::{self as ro, Control};
            let (h, app, control) = match command {
                RolloutCommand::Status { app, watch, hub } => {
                    let mut client = view::connect(&hub.hub, &hub.hub_name, &hub.certs, &hub.operator).await?;
                    return ro::status(&mut client, app.as_deref(), watch, hub.output).await;
                }
                RolloutCommand::Pause { app, hub } => (hub, app, Control::Pause),
                RolloutCommand::Resume { app, hub } => (hub, app, Control::Resume),
                RolloutCommand::Abort { app, hub } => (hub, app, Control::Abort),
                RolloutCommand::Retry { app, hub } => (hub, app, Control::Retry),
                RolloutCommand::Approve { app, wave, hub } => (hub, app, Control::Approve(wave)),
                RolloutCommand::Rollback { app, revision, now, hub } => {
                    (hub, app, Control::Rollback { revision, immediate: now })
                }
            };
            let mut client = view::connect(&h.hub, &h.hub_name, &h.certs, &h.operator).await?;
            ro::control(&mut client, &app, control).await
        }
        Command::Rehearse { repo, clusters, from, to, fail_images, timeout_seconds, transport } => {
            let transport = match transport.as_str() {
                "tcp" => Some(flotilla_cli::local::Transport::Tcp),
                "memory" => Some(flotilla_cli::local::Transport::Memory),
                _ => None,
            };
            let o = flotilla_cli::rehearse::Options {
                clusters,
                from,
                to,
                fail_images,
                timeout: std::time::Duration::from_secs(timeout_seconds),
                transport,
            };
            flotilla_cli::rehearse::run(&repo, o).await
        }
        Command::Explain { cluster, app, hub: h } => {
            let mut client = view::connect(&h.hub, &h.hub_name, &h.certs, &h.operator).await?;
            flotilla_cli::rollout::explain(&mut client, &cluster, app.as_deref()).await
        }
        Command::Audit { since, who, limit, hub: h } => {
            let now = chrono::Utc::now().timestamp_millis();
            let since = since.map(|s| flotilla_cli::access::parse_since(&s, now)).transpose()?.unwrap_or(0);
            let mut client = view::connect(&h.hub, &h.hub_name, &h.certs, &h.operator).await?;
            flotilla_cli::access::audit(&mut client, since, who.as_deref().unwrap_or(""), limit, h.output).await
        }
        Command::JoinToken { command: JoinTokenCommand::Create { cluster, ttl, uses, hub: h } } => {
            let mut client = view::connect(&h.hub, &h.hub_name, &h.certs, &h.operator).await?;
            flotilla_cli::access::create_join_token(&mut client, &cluster, ttl, uses, h.output).await
        }
        Command::Whoami { hub: h } => {
            let mut client = view::connect(&h.hub, &h.hub_name, &h.certs, &h.operator).await?;
            flotilla_cli::access::whoami(&mut client, h.output).await
        }
        Command::Cluster { name, hub: h } => {
            let mut client = view::connect(&h.hub, &h.hub_name, &h.certs, &h.operator).await?;
            view::cluster(&mut client, &name, h.output).await
        }
    }
}
