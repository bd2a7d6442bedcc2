//! Typed payloads: MessagePack by default, JSON as an option.

use std::fmt;

use serde::{de::DeserializeOwned, Serialize};

use crate::error::CodecError;

/// How a typed payload is turned into bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// MessagePack with field names (`rmp_serde::to_vec_named`): compact, and still readable by
    /// other languages' MessagePack libraries as a map. The default.
    #[default]
    MessagePack,
    /// JSON (`serde_json`).
    Json,
}

impl Codec {
    /// Encodes `value`.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        match self {
            Codec::MessagePack => rmp_serde::to_vec_named(value).map_err(|e| {
                CodecError::new("payload could not be encoded as msgpack", Some(e.into()))
            }),
            Codec::Json => serde_json::to_vec(value).map_err(|e| {
                CodecError::new("payload could not be encoded as json", Some(e.into()))
            }),
        }
    }

    /// Decodes `bytes`.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        match self {
            Codec::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| {
                CodecError::new("payload is not the expected msgpack value", Some(e.into()))
            }),
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| {
                CodecError::new("payload is not the expected json value", Some(e.into()))
            }),
        }
    }

    /// The content type this codec writes.
    pub fn content_type(self) -> ContentType {
        match self {
            Codec::MessagePack => ContentType::MessagePack,
            Codec::Json => ContentType::Json,
        }
    }
}

/// What an envelope's payload bytes are, carried in the `Bus-Content-Type` header.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum ContentType {
    /// `application/msgpack`.
    MessagePack,
    /// `application/json`.
    Json,
    /// `application/octet-stream`: bytes the bus does not interpret. The default for raw bytes.
    #[default]
    Bytes,
    /// Any other media type, kept as written.
    Other(String),
}

impl ContentType {
    /// The media type string.
    pub fn as_str(&self) -> &str {
        match self {
            ContentType::MessagePack => "application/msgpack",
            ContentType::Json => "application/json",
            ContentType::Bytes => "application/octet-stream",
            ContentType::Other(s) => s,
        }
    }

    /// Parses a media type string; unknown ones become [`ContentType::Other`].
    pub fn parse(value: &str) -> Self {
        match value {
            "application/msgpack" => ContentType::MessagePack,
            "application/json" => ContentType::Json,
            "application/octet-stream" => ContentType::Bytes,
            other => ContentType::Other(other.to_owned()),
        }
    }

    /// The codec that reads this content type, if the bus has one.
    pub fn codec(&self) -> Option<Codec> {
        match self {
            ContentType::MessagePack => Some(Codec::MessagePack),
            ContentType::Json => Some(Codec::Json),
            _ => None,
        }
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
