//! Records the git commit the binary is built from, for `dynamix --version`.
//!
//! Outside a git checkout (a source tarball, `cargo install` from a registry) the commit is
//! `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    Some(text.trim().to_string())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=DYNAMIX_GIT_COMMIT={commit}");
    // Rebuild the version string when HEAD moves (commit, checkout).
    // Only files that exist: cargo reruns a build script on every build for a missing one.
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let head_ref = git(&["symbolic-ref", "-q", "HEAD"]);
        let watched = ["HEAD", "packed-refs"]
            .into_iter()
            .map(String::from)
            .chain(head_ref);
        for file in watched {
            let path = std::path::Path::new(&git_dir).join(file);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
