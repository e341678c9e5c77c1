//! Records the git commit tether is built from, for `tether --version`.
//!
//! `TETHER_GIT_COMMIT` in the environment wins (for builds from a source
//! tarball that know their commit); otherwise `git rev-parse --short HEAD`;
//! otherwise "unknown" (not in a git checkout, or no git).

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TETHER_GIT_COMMIT");
    let commit = std::env::var("TETHER_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=TETHER_GIT_COMMIT={commit}");

    // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it points
    // to (a commit), and packed-refs (refs packed by git gc). In a worktree,
    // HEAD lives in the worktree's git dir and the refs in the common one.
    // Only paths that exist are named: cargo re-runs for a missing one every time.
    let (Some(git_dir), Some(common)) = (git(&["rev-parse", "--git-dir"]), git(&["rev-parse", "--git-common-dir"])) else {
        return;
    };
    let (git_dir, common) = (PathBuf::from(git_dir), PathBuf::from(common));
    let mut watch = vec![git_dir.join("HEAD"), common.join("packed-refs")];
    if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(git_dir.join(&head_ref));
        watch.push(common.join(&head_ref));
    }
    for path in watch.iter().filter(|p| Path::exists(p)) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
