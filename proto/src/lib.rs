//! The forkd daemon API (`forkd.v1`), generated at build time from
//! `proto/forkd/v1/forkd.proto` with tonic/prost (protoc comes from Debian's
//! `protobuf-compiler`). The .proto's comments are the API reference. [`convert`] maps its
//! messages to and from forkd-core's types, for the daemon and its clients alike.

#![allow(clippy::all, missing_docs)]

pub mod codec;
pub mod convert;

/// Generated messages, clients (`*_client`) and servers (`*_server`).
pub mod v1 {
    tonic::include_proto!("forkd.v1");
}

/// The encoded `FileDescriptorSet` of `forkd.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("forkd_descriptor");
