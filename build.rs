//! Links the unwinder (`libgcc_eh.a`) into the binaries instead of loading
//! `libgcc_s.so.1` at start: on glibc targets std needs it only for
//! backtraces and unwinding panics, and the shared library's pages cost
//! 60-140 KiB of start-up RSS (medians over 20 starts each, see README).
//! This is what `-static-libgcc` does for C programs.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-lib=static:-bundle=gcc_eh");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
