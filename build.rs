//! Compiles `proto/` with protox (no system protoc) and keeps the descriptor
//! set for gRPC server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/deltasync/v1/sync.proto",
        "proto/deltasync/v1/replication.proto",
        "proto/deltasync/v1/admin.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(protos)?
        .file_descriptor_set();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("deltasync_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // Bodies stay in their wire encoding end to end (see `store::body`).
    tonic_prost_build::configure()
        .extern_path(
            ".google.protobuf.Struct",
            "crate::store::model::EncodedBody",
        )
        // Replicated bodies are shared with the record, not copied.
        .bytes(".deltasync.v1.ReplicatedRecord.body")
        .compile_fds(descriptors)?;
    Ok(())
}
