//! Following the fleet repository with gix: a bare clone on first use, incremental fetches after that (never
//! a fresh clone per poll), and the files of the followed branch's head commit as a [`Tree`].
//!
//! gix is blocking here; the hub calls [`Follower::fetch`] from `spawn_blocking`.
//!
//! Private repositories: HTTP(S) with basic credentials or a token ([`GitAuth::Basic`], the secret read from a
//! file or the environment at every fetch, so a rotated token is picked up), SSH with a key file
//! ([`GitAuth::Ssh`], run through the system's `ssh`).

use flotilla_common::fleet::Tree;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cloning {url} failed")]
    CloneFailed {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("fetching {url} failed")]
    FetchFailed {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("branch {branch:?} does not exist in {url}")]
    BranchMissing { url: String, branch: String },
    #[error("reading commit {revision} failed")]
    ReadFailed {
        revision: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

const REFSPEC: &str = "+refs/heads/*:refs/remotes/origin/*";

/// The credentials written into a URL, if any: any user part of an http(s) URL (a token is often written as
/// the user), or a `user:password` in any URL. An SSH user name (`ssh://git@host`) is not a secret.
fn userinfo(url: &str) -> Option<&str> {
    let scheme_end = url.find("://")?;
    let rest = &url[scheme_end + 3..];
    let host_end = rest.find('/').unwrap_or(rest.len());
    let info = &rest[..rest[..host_end].rfind('@')?];
    let http = url[..scheme_end].eq_ignore_ascii_case("http") || url[..scheme_end].eq_ignore_ascii_case("https");
    (http || info.contains(':')).then_some(info)
}

/// The URL as it may be shown: credentials written into it replaced by `***`.
pub fn redacted_url(url: &str) -> String {
    match userinfo(url) {
        Some(info) if !info.is_empty() => url.replacen(info, "***", 1),
        _ => url.to_string(),
    }
}

/// An error whose text may carry the URL's credentials, with them replaced by `***` throughout its chain.
fn scrubbed(e: Box<dyn std::error::Error + Send + Sync>, url: &str) -> Box<dyn std::error::Error + Send + Sync> {
    match userinfo(url).filter(|i| !i.is_empty()) {
        None => e,
        Some(info) => crate::hub::error_chain(e.as_ref()).replace(info, "***").into(),
    }
}

/// A secret read when it is needed, never logged.
#[derive(Clone)]
pub enum Secret {
    Literal(String),
    File(PathBuf),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Literal(_) => write!(f, "Secret(<redacted>)"),
            Secret::File(p) => write!(f, "Secret(file {})", p.display()),
        }
    }
}

impl Secret {
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            Secret::Literal(s) => Ok(s.clone()),
            Secret::File(p) => Ok(std::fs::read_to_string(p)?.trim_end_matches(['\n', '\r']).to_string()),
        }
    }
}

/// How the hub authenticates to the fleet repository.
#[derive(Debug, Clone, Default)]
pub enum GitAuth {
    #[default]
    None,
    /// HTTP(S) basic credentials. A token is a password: GitHub takes any user name with it (we send
    /// `x-access-token`), GitLab takes `oauth2`.
    Basic { username: String, password: Secret },
    /// SSH with a private key file. Without `known_hosts`, the host key is trusted on first use and pinned in
    /// `<clone>.known_hosts`.
    Ssh { key_file: PathBuf, known_hosts: Option<PathBuf> },
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl GitAuth {
    /// Configuration given to gix for this authentication (the ssh command for SSH).
    pub fn config_overrides(&self, clone_dir: &Path) -> Vec<String> {
        match self {
            GitAuth::Ssh { key_file, known_hosts } => {
                let (hosts, strict) = match known_hosts {
                    Some(k) => (k.clone(), "yes"),
                    None => (clone_dir.with_extension("known_hosts"), "accept-new"),
                };
                vec![format!(
                    "core.sshCommand=ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile={} -o StrictHostKeyChecking={strict}",
                    shell_quote(&key_file.to_string_lossy()),
                    shell_quote(&hosts.to_string_lossy()),
                )]
            }
            _ => Vec::new(),
        }
    }
}

type Credentials = Option<(String, String)>;

/// A gix credentials helper answering with fixed credentials, or refusing (no prompt) without them.
fn helper(
    creds: Credentials,
) -> impl FnMut(gix::credentials::helper::Action) -> gix::Result<Option<gix::credentials::protocol::Outcome>> {
    move |action| match (action, &creds) {
        (gix::credentials::helper::Action::Get(ctx), Some((username, password))) => {
            Ok(Some(gix::credentials::protocol::Outcome {
                identity: gix::sec::identity::Account {
                    username: username.clone(),
                    password: password.clone(),
                    oauth_refresh_token: None,
                },
                next: ctx.into(),
            }))
        }
        _ => Ok(None),
    }
}

/// The files of one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The commit id, hex.
    pub revision: String,
    pub tree: Tree,
}

/// Follows one branch of one repository, keeping a bare clone in `dir`.
#[derive(Debug, Clone)]
pub struct Follower {
    url: String,
    branch: String,
    dir: PathBuf,
    auth: GitAuth,
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

impl Follower {
    /// `url`: file://, git://, http(s):// or a local path.
    pub fn new(url: impl Into<String>, branch: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        Follower { url: url.into(), branch: branch.into(), dir: dir.into(), auth: GitAuth::None }
    }

    pub fn with_auth(mut self, auth: GitAuth) -> Self {
        self.auth = auth;
        self
    }

    fn credentials(&self) -> Result<Credentials, Box<dyn std::error::Error + Send + Sync>> {
        match &self.auth {
            GitAuth::Basic { username, password } => {
                let secret = password.read().map_err(|e| format!("reading the Git password or token: {e}"))?;
                Ok(Some((username.clone(), secret)))
            }
            _ => Ok(None),
        }
    }

    fn open_options(&self) -> gix::open::Options {
        gix::open::Options::default().cli_overrides(self.auth.config_overrides(&self.dir))
    }

    /// The repository's URL as it may be shown (credentials in it replaced by `***`).
    pub fn url(&self) -> String {
        redacted_url(&self.url)
    }

    /// Fetches the branch and returns the files of its head commit.
    pub fn fetch(&self) -> Result<Snapshot, GitError> {
        let repo = if self.dir.join("HEAD").exists() { self.fetch_existing()? } else { self.clone_bare()? };
        self.read(&repo)
    }

    fn clone_bare(&self) -> Result<gix::Repository, GitError> {
        let err = |e| GitError::CloneFailed { url: self.url(), source: scrubbed(e, &self.url) };
        if let Some(parent) = self.dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| err(boxed(e)))?;
        }
        let interrupt = AtomicBool::new(false);
        let creds = self.credentials().map_err(err)?;
        let mut prepare = gix::clone::PrepareFetch::new(
            self.url.as_str(),
            &self.dir,
            gix::create::Kind::Bare,
            gix::create::Options::default(),
            self.open_options(),
        )
        .map_err(|e| err(boxed(e)))?
        .configure_connection(move |conn| {
            conn.set_credentials(helper(creds.clone()));
            Ok(())
        });
        let (repo, _) = prepare.fetch_only(gix::progress::Discard, &interrupt).map_err(|e| err(boxed(e)))?;
        Ok(repo)
    }

    fn fetch_existing(&self) -> Result<gix::Repository, GitError> {
        let err = |e| GitError::FetchFailed { url: self.url(), source: scrubbed(e, &self.url) };
        let repo = gix::open_opts(&self.dir, self.open_options()).map_err(|e| err(boxed(e)))?;
        let interrupt = AtomicBool::new(false);
        let creds = self.credentials().map_err(err)?;
        {
            // A bare clone records no fetch refspec; follow every branch into refs/remotes/origin/.
            // The configured URL, even when the clone was made from another one.
            let remote = repo
                .remote_at(self.url.as_str())
                .map_err(|e| err(boxed(e)))?
                .with_refspecs([REFSPEC], gix::remote::Direction::Fetch)
                .map_err(|e| err(boxed(e)))?;
            remote
                .connect(gix::remote::Direction::Fetch)
                .map_err(|e| err(boxed(e)))?
                .with_credentials(helper(creds))
                .prepare_fetch(gix::progress::Discard, Default::default())
                .map_err(|e| err(boxed(e)))?
                .receive(gix::progress::Discard, &interrupt)
                .map_err(|e| err(boxed(e)))?;
        }
        Ok(repo)
    }

    fn read(&self, repo: &gix::Repository) -> Result<Snapshot, GitError> {
        let missing = || GitError::BranchMissing { url: self.url(), branch: self.branch.clone() };
        let mut id = None;
        for name in [format!("refs/remotes/origin/{}", self.branch), format!("refs/heads/{}", self.branch)] {
            if let Ok(Some(mut r)) = repo.try_find_reference(name.as_str()) {
                if let Ok(peeled) = r.peel_to_id() {
                    id = Some(peeled.detach());
                    break;
                }
            }
        }
        read_commit(repo, id.ok_or_else(missing)?)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The files of the commit `id` in `repo`.
fn read_commit(repo: &gix::Repository, id: gix::ObjectId) -> Result<Snapshot, GitError> {
    let revision = id.to_string();
    let err = |e| GitError::ReadFailed { revision: revision.clone(), source: e };
    let commit = repo.find_commit(id).map_err(|e| err(boxed(e)))?;
    let root = commit.tree().map_err(|e| err(boxed(e)))?;
    let mut recorder = gix::traverse::tree::Recorder::default();
    root.traverse().breadthfirst(&mut recorder).map_err(|e| err(boxed(e)))?;
    let mut tree = Tree::new();
    for entry in recorder.records {
        if entry.mode.is_blob() {
            // A file over the limit is never loaded: its app is refused with its size.
            let size = repo.find_header(entry.oid).map_err(|e| err(boxed(e)))?.size();
            if size > flotilla_common::fleet::MAX_FILE_BYTES {
                tree.insert(entry.filepath.to_string(), flotilla_common::fleet::oversized(size));
                continue;
            }
            let object = repo.find_object(entry.oid).map_err(|e| err(boxed(e)))?;
            tree.insert(entry.filepath.to_string(), object.data.clone());
        }
    }
    Ok(Snapshot { revision, tree })
}

/// The files at `rev` (a commit id, branch, tag or any rev-parse expression) of the local repository at
/// `path` (a checkout or a bare repository): for offline commands such as `flotilla diff`.
pub fn snapshot_at(path: &Path, rev: &str) -> Result<Snapshot, GitError> {
    let repo = gix::discover(path).map_err(|e| GitError::ReadFailed { revision: rev.to_string(), source: boxed(e) })?;
    let id = repo
        .rev_parse_single(rev)
        .map_err(|e| GitError::ReadFailed { revision: rev.to_string(), source: boxed(e) })?
        .object()
        .map_err(|e| GitError::ReadFailed { revision: rev.to_string(), source: boxed(e) })?
        .peel_to_commit()
        .map_err(|e| GitError::ReadFailed { revision: rev.to_string(), source: boxed(e) })?
        .id;
    read_commit(&repo, id)
}
