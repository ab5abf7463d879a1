#![recursion_limit = "256"]
//! The `flotilla` command's building blocks, kept in a library so tests and the demo use them directly.

pub mod access;
pub mod demo;
pub mod local;
pub mod rehearse;
pub mod render;
pub mod rollout;
pub mod view;
