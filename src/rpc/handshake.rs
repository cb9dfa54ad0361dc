//! The connection handshake, before any tarpc frame.
//!
//! The caller sends a [`Hello`] frame, the callee answers with a [`HelloReply`] frame. A frame
//! is `b"FLEET\0"`, a version as a big-endian `u16`, the body length as a big-endian `u32` (at
//! most [`MAX_HELLO_BYTES`]) and the body: bincode of the message, then a big-endian `u16`
//! trailer. The magic bytes reject garbage and other protocols at the first read.
//!
//! **Versions are negotiated.** The header carries the oldest protocol version the sender
//! speaks ([`MIN_PROTOCOL_VERSION`]); a hello's trailer the newest ([`PROTOCOL_VERSION`]); a
//! reply's trailer the version the callee chose: the newest both speak. Fleet 6 and earlier
//! wrote no trailer and check the header for equality with their own version, so this build
//! writes 6 in the header, and reads a frame without a trailer as coming from a node that
//! speaks its header's version only; fleet 6 ignores the trailer (bincode decodes the message
//! and leaves the rest). A node whose versions do not overlap this one's is told so in words.

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
/// version 7 backups (`backup_chunk`); version 8 live output (`append_output`, `read_output`);
/// version 9 `requeue_task`.
pub const PROTOCOL_VERSION: u16 = 9;
/// The oldest protocol version this build still speaks: a cluster can be upgraded (and rolled
/// back) one node at a time between builds whose ranges overlap. A connection uses the newest
/// version both ends speak; a call that the other end's version lacks is not sent to it.
pub const MIN_PROTOCOL_VERSION: u16 = 6;
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
        "the peer speaks fleet protocol versions {0} to {1}; this node speaks versions \
         {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
    )]
    Version(u16, u16),
    #[error("malformed handshake: {0}")]
    Malformed(String),
}

/// The bytes of one handshake frame carrying `body` and the version `trailer` (see the
/// module docs).
pub fn frame<T: Serialize>(body: &T, trailer: u16) -> Result<Vec<u8>, HandshakeError> {
    let mut body = bincode::serde::encode_to_vec(body, bincode::config::standard())
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    body.extend_from_slice(&trailer.to_be_bytes());
    let mut buf = Vec::with_capacity(12 + body.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&MIN_PROTOCOL_VERSION.to_be_bytes());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    Ok(buf)
}

pub async fn write_frame<T: Serialize>(
    s: &mut TcpStream,
    body: &T,
    trailer: u16,
) -> Result<(), HandshakeError> {
    s.write_all(&frame(body, trailer)?).await?;
    Ok(())
}

/// A frame read: the message, the oldest version its sender speaks (the header) and its
/// trailer (the header again when there is none: fleet 6 and earlier).
#[derive(Debug)]
pub struct Received<T> {
    pub body: T,
    pub oldest: u16,
    pub trailer: u16,
}

/// Decodes a frame's body (after the 12-byte header).
pub fn decode_body<T: DeserializeOwned>(
    oldest: u16,
    body: &[u8],
) -> Result<Received<T>, HandshakeError> {
    let (value, used) = bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    let trailer = match body.get(used..used + 2) {
        Some(t) => u16::from_be_bytes([t[0], t[1]]),
        None => oldest,
    };
    Ok(Received {
        body: value,
        oldest,
        trailer,
    })
}

/// Reads one handshake frame, checking magic, version and size before decoding.
pub async fn read_frame<T: DeserializeOwned>(
    s: &mut TcpStream,
) -> Result<Received<T>, HandshakeError> {
    let read = async {
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        if &head[..6] != MAGIC {
            return Err(HandshakeError::BadMagic(head[..6].to_vec()));
        }
        let oldest = u16::from_be_bytes([head[6], head[7]]);
        if oldest > PROTOCOL_VERSION {
            return Err(HandshakeError::Version(oldest, oldest));
        }
        let len = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
        if len > MAX_HELLO_BYTES {
            return Err(HandshakeError::Malformed(format!(
                "handshake of {len} bytes; at most {MAX_HELLO_BYTES} are accepted"
            )));
        }
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).await?;
        decode_body(oldest, &body)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

/// The version a callee uses with a caller that speaks `oldest` to `newest`: the newest both
/// speak, or the error that says they share none.
pub fn negotiate(oldest: u16, newest: u16) -> Result<u16, HandshakeError> {
    let v = newest.min(PROTOCOL_VERSION);
    if v < MIN_PROTOCOL_VERSION.max(oldest) {
        return Err(HandshakeError::Version(oldest, newest));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_negotiated_with_old_and_new_peers() {
        assert_eq!(negotiate(6, 6).unwrap(), 6, "a fleet 6 peer");
        assert_eq!(negotiate(6, 7).unwrap(), 7);
        assert_eq!(negotiate(6, 8).unwrap(), 8);
        assert_eq!(negotiate(6, 9).unwrap(), 9);
        let (newer, newest) = (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2);
        assert_eq!(
            negotiate(6, newer).unwrap(),
            PROTOCOL_VERSION,
            "a newer peer"
        );
        assert!(
            negotiate(newer, newest).is_err(),
            "a peer that dropped our versions"
        );
        assert!(negotiate(1, 5).is_err(), "a peer older than we speak");
        let e = negotiate(newer, newest).unwrap_err().to_string();
        assert!(
            e.contains(&format!("versions {newer} to {newest}"))
                && e.contains(&format!("versions 6 to {PROTOCOL_VERSION}")),
            "{e}"
        );
    }

    #[test]
    fn a_fleet_6_hello_without_a_trailer_reads_as_version_6() {
        // The first frame of the committed v6 fixture: a Hello as fleet 6 wrote it.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/formats/handshake-v6.bin"
        );
        let packed = std::fs::read(path).unwrap();
        let n = u32::from_le_bytes(packed[..4].try_into().unwrap()) as usize;
        let v6 = &packed[4..4 + n];
        assert_eq!(&v6[..6], MAGIC);
        let oldest = u16::from_be_bytes([v6[6], v6[7]]);
        assert_eq!(oldest, 6);
        let got: Received<Hello> = decode_body(oldest, &v6[12..]).unwrap();
        assert_eq!((got.oldest, got.trailer), (6, 6));
        assert_eq!(got.body.cluster_name, "fleet");
        assert_eq!(negotiate(got.oldest, got.trailer).unwrap(), 6);
        // And what this build writes, fleet 6 reads: header 6, the message first.
        let ours = frame(&got.body, PROTOCOL_VERSION).unwrap();
        assert_eq!(u16::from_be_bytes([ours[6], ours[7]]), 6);
        let (back, used): (Hello, usize) =
            bincode::serde::decode_from_slice(&ours[12..], bincode::config::standard()).unwrap();
        assert_eq!(back.auth_token, got.body.auth_token);
        assert_eq!(ours.len() - 12 - used, 2, "only the trailer follows");
    }
}
