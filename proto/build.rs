//! Generates the forkd.v1 messages, clients and servers, and the descriptor set for reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let proto = "proto/forkd/v1/forkd.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-env-changed=PROTOC");
    // protoc comes from Debian's protobuf-compiler (scripts/setup.sh installs it) or $PROTOC.
    let protoc = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    if std::process::Command::new(&protoc).arg("--version").output().is_err() {
        return Err(format!(
            "forkd-proto needs protoc ({:?} not found): `apt-get install protobuf-compiler` (scripts/setup.sh does), or set PROTOC",
            protoc
        )
        .into());
    }
    tonic_prost_build::configure()
        .build_transport(false)
        .codec_path("crate::codec::Codec")
        .file_descriptor_set_path(out.join("forkd_descriptor.bin"))
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
