//! Code generated from `proto/deltasync/v1/sync.proto`; nothing hand-written.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("deltasync.v1");

/// The encoded descriptor set (our files and their imports) for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/deltasync_descriptor.bin"));
