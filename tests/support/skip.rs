//! A test that needs a real component (a browser, nginx, systemd-analyze)
//! which this machine lacks: one visible `skipped:` line and a pass, except
//! under `CI=true`, where `.ci/run` was to install it and the test fails.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

/// Skips `test` (or fails it under `CI=true`) for `why`.
pub fn skip(test: &str, why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} cannot run under CI: {why}");
    }
    // Straight to the terminal: the test harness captures `println!` of a
    // passing test, and a skip must not look like a silent `ok`.
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
}

/// Where `name` is installed: on `PATH`, or in the `sbin` directories a
/// non-root `PATH` often lacks (Debian's nginx is `/usr/sbin/nginx`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
