//! Generates the gRPC services from `proto/` with the protoc shipped by the
//! `protoc-bin-vendored` crate, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Shared, not copied, when one resource goes to many subscribers.
    config.bytes([".ambit.config.v1.Resource.json"]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/ca.proto", "proto/config.proto"],
        &["proto"],
    )?;
    Ok(())
}
