//! Generates the tonic/prost types from `proto/*.proto`.
//!
//! protoc comes from `protoc-bin-vendored`, so neither a developer machine nor CI needs
//! Debian's protobuf-compiler; `PROTOC` in the environment still wins when set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    println!("cargo:rerun-if-changed=proto/ringmaster.proto");
    // The descriptor set feeds the coordinator's gRPC reflection service (grpcurl list/describe).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ringmaster_descriptor.bin"))
        .compile_protos(&["proto/ringmaster.proto"], &["proto"])?;
    Ok(())
}
