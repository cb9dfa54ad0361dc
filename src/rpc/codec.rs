//! The tarpc transport: length-delimited frames carrying bincode 2 values.
//!
//! Decoding is bounded by [`MAX_FRAME_BYTES`](super::MAX_FRAME_BYTES) twice over: the framing
//! refuses a longer frame before reading it, and bincode refuses to allocate beyond it while
//! decoding, so garbage on the wire costs at most one frame and closes the connection with a
//! logged reason, never a panic or an unbounded allocation.

use std::io;
use std::marker::PhantomData;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::MAX_FRAME_BYTES;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

/// A bincode 2 codec for tokio-serde. `peer` names the other end in logs.
pub struct Bincode2<Item, SinkItem> {
    peer: String,
    _p: PhantomData<fn(SinkItem) -> Item>,
}

impl<Item, SinkItem> Bincode2<Item, SinkItem> {
    pub fn new(peer: String) -> Self {
        Bincode2 {
            peer,
            _p: PhantomData,
        }
    }
}

impl<Item, SinkItem: Serialize> tokio_serde::Serializer<SinkItem> for Bincode2<Item, SinkItem> {
    type Error = io::Error;
    fn serialize(self: Pin<&mut Self>, item: &SinkItem) -> Result<Bytes, io::Error> {
        bincode::serde::encode_to_vec(item, config())
            .map(Bytes::from)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

impl<Item: DeserializeOwned, SinkItem> tokio_serde::Deserializer<Item>
    for Bincode2<Item, SinkItem>
{
    type Error = io::Error;
    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> Result<Item, io::Error> {
        bincode::serde::decode_from_slice(src, config()).map(|(v, _)| v).map_err(|e| {
            tracing::warn!(peer = %self.peer, error = %e, "closing connection: undecodable frame");
            io::Error::new(io::ErrorKind::InvalidData, e)
        })
    }
}

/// Wraps a handshaken TCP stream into tarpc's serde transport.
pub fn transport<Item, SinkItem>(
    stream: TcpStream,
    peer: String,
) -> tarpc::serde_transport::Transport<TcpStream, Item, SinkItem, Bincode2<Item, SinkItem>>
where
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    let framing = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_codec();
    tarpc::serde_transport::new(Framed::new(stream, framing), Bincode2::new(peer))
}
