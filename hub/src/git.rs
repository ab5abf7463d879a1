//! Following the fleet repository with gix: a bare clone on first use, incremental fetches after that (never
//! a fresh clone per poll), and the files of the followed branch's head commit as a [`Tree`].
//!
//! gix is blocking here; the hub calls [`Follower::fetch`] from `spawn_blocking`.

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
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

impl Follower {
    /// `url`: file://, git://, http(s):// or a local path.
    pub fn new(url: impl Into<String>, branch: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        Follower { url: url.into(), branch: branch.into(), dir: dir.into() }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Fetches the branch and returns the files of its head commit.
    pub fn fetch(&self) -> Result<Snapshot, GitError> {
        let repo = if self.dir.join("HEAD").exists() { self.fetch_existing()? } else { self.clone_bare()? };
        self.read(&repo)
    }

    fn clone_bare(&self) -> Result<gix::Repository, GitError> {
        let err = |e| GitError::CloneFailed { url: self.url.clone(), source: e };
        if let Some(parent) = self.dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| err(boxed(e)))?;
        }
        let interrupt = AtomicBool::new(false);
        let mut prepare = gix::prepare_clone_bare(self.url.as_str(), &self.dir).map_err(|e| err(boxed(e)))?;
        let (repo, _) = prepare.fetch_only(gix::progress::Discard, &interrupt).map_err(|e| err(boxed(e)))?;
        Ok(repo)
    }

    fn fetch_existing(&self) -> Result<gix::Repository, GitError> {
        let err = |e| GitError::FetchFailed { url: self.url.clone(), source: e };
        let repo = gix::open(&self.dir).map_err(|e| err(boxed(e)))?;
        let interrupt = AtomicBool::new(false);
        {
            // A bare clone records no fetch refspec; follow every branch into refs/remotes/origin/.
            let remote = repo
                .find_remote("origin")
                .map_err(|e| err(boxed(e)))?
                .with_refspecs([REFSPEC], gix::remote::Direction::Fetch)
                .map_err(|e| err(boxed(e)))?;
            remote
                .connect(gix::remote::Direction::Fetch)
                .map_err(|e| err(boxed(e)))?
                .prepare_fetch(gix::progress::Discard, Default::default())
                .map_err(|e| err(boxed(e)))?
                .receive(gix::progress::Discard, &interrupt)
                .map_err(|e| err(boxed(e)))?;
        }
        Ok(repo)
    }

    fn read(&self, repo: &gix::Repository) -> Result<Snapshot, GitError> {
        let missing = || GitError::BranchMissing { url: self.url.clone(), branch: self.branch.clone() };
        let mut id = None;
        for name in [format!("refs/remotes/origin/{}", self.branch), format!("refs/heads/{}", self.branch)] {
            if let Ok(Some(mut r)) = repo.try_find_reference(name.as_str()) {
                if let Ok(peeled) = r.peel_to_id() {
                    id = Some(peeled.detach());
                    break;
                }
            }
        }
        let id = id.ok_or_else(missing)?;
        let revision = id.to_string();
        let err = |e| GitError::ReadFailed { revision: revision.clone(), source: e };
        let commit = repo.find_commit(id).map_err(|e| err(boxed(e)))?;
        let root = commit.tree().map_err(|e| err(boxed(e)))?;
        let mut recorder = gix::traverse::tree::Recorder::default();
        root.traverse().breadthfirst(&mut recorder).map_err(|e| err(boxed(e)))?;
        let mut tree = Tree::new();
        for entry in recorder.records {
            if entry.mode.is_blob() {
                let object = repo.find_object(entry.oid).map_err(|e| err(boxed(e)))?;
                tree.insert(entry.filepath.to_string(), object.data.clone());
            }
        }
        Ok(Snapshot { revision, tree })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
