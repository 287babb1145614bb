//! Link flags for toolwarden's binaries.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    // Packed relative relocations (DT_RELR: binutils 2.38, glibc 2.36). As a PIE the
    // binary carries about 115,000 relative relocations, 2.7 MB of `.rela.dyn` that the
    // loader (or, statically linked, the binary itself) reads in full at every start, so
    // they stayed resident in every runner; packed they take a few KB. Every process of
    // the runner (zygote, keepers, container inits) maps this same executable.
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg=-Wl,-z,pack-relative-relocs");
    }
}
