//! Compiles proto/ with protox (pure Rust), so building needs no system `protoc`, and keeps the
//! descriptor set for the gRPC reflection service.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "envoy/service/ratelimit/v3/rls.proto",
        "kuadrant/service/ratelimit/v1/ratelimit.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("ratekeeper_descriptors.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
