//! The protobuf codec of the forkd API: prost's, except that a request that does not decode
//! (e.g. a `string` field holding invalid UTF-8) is `INVALID_ARGUMENT` naming the field, not
//! `INTERNAL`: it is the client's mistake, not the daemon's.

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

/// `tonic::codec::Codec` for prost messages with client-error decode failures.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`, answering `INVALID_ARGUMENT` for bytes that are not a valid `U`.
#[derive(Debug, Clone)]
pub struct CheckedDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: prost::Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| Status::invalid_argument(decode_error_message(&e.to_string())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// `invalid <field>: <prost's message>`; prost names the failing field as `Message.field`.
pub fn decode_error_message(prost_message: &str) -> String {
    let field = prost_message
        .split(": ")
        .find_map(|part| {
            let (message, field) = part.rsplit_once('.')?;
            let ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            (ident(message) && ident(field) && message.starts_with(|c: char| c.is_ascii_uppercase()))
                .then(|| field.to_string())
        })
        .unwrap_or_else(|| "request".to_string());
    format!("invalid {field}: {prost_message}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_field() {
        let m = super::decode_error_message(
            "failed to decode Protobuf message: ExecRequest.args: invalid string value: data is not UTF-8 encoded",
        );
        assert!(m.starts_with("invalid args: "), "{m}");
        assert!(super::decode_error_message("buffer underflow").starts_with("invalid request: "));
    }
}
