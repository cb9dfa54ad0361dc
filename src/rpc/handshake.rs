//! The connection handshake, before any tarpc frame.
//!
//! The caller sends a [`Hello`] frame, the callee answers with a [`HelloReply`] frame. A frame
//! is `b"FLEET\0"`, the protocol version as a big-endian `u16`, the body length as a big-endian
//! `u32` (at most [`MAX_HELLO_BYTES`]) and a bincode body. The magic bytes reject garbage and
//! other protocols at the first read; the version is checked before the body is decoded, so a
//! node of another protocol version is told so in words, not with a decode error.

use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Role;
use crate::raft::NodeId;

pub const MAGIC: &[u8; 6] = b"FLEET\0";
/// The wire protocol version. Bumped on any incompatible change of the handshake or of
/// [`FleetService`](super::FleetService)'s messages. Version 2 added [`Role::Worker`] and the
/// clock fault; version 3 the auth token; version 4 the reachability fields of the health
/// report; version 5 schedules and pools; version 6 workflows, runs and `submit --after`;
/// version 7 backups (`backup_chunk`).
pub const PROTOCOL_VERSION: u16 = 7;
pub const MAX_HELLO_BYTES: u32 = 64 * 1024;
/// How long either side waits for the other's handshake frame.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The caller's introduction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub cluster_name: String,
    /// The caller's cluster id, when it has one. A callee that has one too refuses a mismatch.
    pub cluster_id: Option<u128>,
    pub role: Role,
    /// The caller's node id (replicas only).
    pub from_node: Option<NodeId>,
    /// The node the caller meant to reach; a callee with another id refuses, so a Raft message
    /// never lands on whichever node now holds an old address.
    pub expect_node: Option<NodeId>,
    /// The cluster's shared secret (`node.auth_token`), empty when none is configured. Sent in
    /// the clear: the transport is plain TCP.
    pub auth_token: String,
}

/// The callee's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HelloReply {
    Accepted {
        node_id: NodeId,
        cluster_id: Option<u128>,
    },
    Rejected {
        reason: String,
    },
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {HANDSHAKE_TIMEOUT:?} waiting for the handshake")]
    Timeout,
    #[error("not a fleet peer (first bytes {0:02x?})")]
    BadMagic(Vec<u8>),
    #[error(
        "the peer speaks fleet protocol version {0}; this node speaks version {PROTOCOL_VERSION}"
    )]
    Version(u16),
    #[error("malformed handshake: {0}")]
    Malformed(String),
}

/// The bytes of one handshake frame carrying `body`.
pub fn frame<T: Serialize>(body: &T) -> Result<Vec<u8>, HandshakeError> {
    let body = bincode::serde::encode_to_vec(body, bincode::config::standard())
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    let mut buf = Vec::with_capacity(12 + body.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    Ok(buf)
}

pub async fn write_frame<T: Serialize>(s: &mut TcpStream, body: &T) -> Result<(), HandshakeError> {
    s.write_all(&frame(body)?).await?;
    Ok(())
}

/// Reads one handshake frame, checking magic, version and size before decoding.
pub async fn read_frame<T: DeserializeOwned>(s: &mut TcpStream) -> Result<T, HandshakeError> {
    let read = async {
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        if &head[..6] != MAGIC {
            return Err(HandshakeError::BadMagic(head[..6].to_vec()));
        }
        let version = u16::from_be_bytes([head[6], head[7]]);
        if version != PROTOCOL_VERSION {
            return Err(HandshakeError::Version(version));
        }
        let len = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
        if len > MAX_HELLO_BYTES {
            return Err(HandshakeError::Malformed(format!(
                "handshake of {len} bytes; at most {MAX_HELLO_BYTES} are accepted"
            )));
        }
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).await?;
        bincode::serde::decode_from_slice(&body, bincode::config::standard())
            .map(|(v, _)| v)
            .map_err(|e| HandshakeError::Malformed(e.to_string()))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| HandshakeError::Timeout)?
}
