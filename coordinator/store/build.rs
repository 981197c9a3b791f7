//! Nothing to generate here: this build script exists so that `protoc-bin-vendored` is a
//! build dependency of the store, which makes cargo fetch it before any build script runs;
//! `tools/protoc` (PROTOC, set in .cargo/config.toml) then finds it for etcd-client's build.

fn main() {
    // Fail early, with the path, if the vendored protoc is missing for this platform.
    if std::env::var_os("PROTOC_REAL").is_none()
        && let Err(e) = protoc_bin_vendored::protoc_bin_path()
    {
        println!("cargo:warning=no vendored protoc for this platform ({e}); set PROTOC");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
