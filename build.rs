//! Compiles proto/ with protox (pure Rust), so building needs no system `protoc`, and keeps the
//! descriptor set of the services ratekeeper serves for the gRPC reflection service.
use prost::Message;

/// The xDS client's protos: compiled, but not offered by reflection (ratekeeper calls these
/// services, it does not serve them).
const XDS_FILES: [&str; 3] = [
    "envoy/service/discovery/v3/discovery.proto",
    "ratelimit/config/ratelimit/v3/rls_conf.proto",
    "google/rpc/status.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "envoy/service/ratelimit/v3/rls.proto",
        "kuadrant/service/ratelimit/v1/ratelimit.proto",
        XDS_FILES[0],
        XDS_FILES[1],
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    let mut served = descriptors.clone();
    served.file.retain(|file| !XDS_FILES.contains(&file.name()));
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("ratekeeper_descriptors.bin"),
        served.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
