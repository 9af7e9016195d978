//! Lets stock gRPC clients call the daemon on its Unix socket.
//!
//! grpc-python, grpc-java and grpcurl send the socket path (grpc-python percent-encodes it) as
//! the HTTP/2 `:authority`. The HTTP/2 server (h2) insists on an RFC 3986 authority and resets
//! every such stream with PROTOCOL_ERROR. A Unix socket has no host name worth checking, so each
//! HTTP/2 connection on it is read through [`AuthorityFix`]: request header blocks are decoded,
//! an `:authority` that is not a valid authority becomes `localhost`, and the block is re-encoded
//! as plain literals. Re-encoding every block (never only some) keeps the server's HPACK table
//! in step: it never gains an entry, whatever the client's table holds.
//! HTTP/1 connections (the REST mirror) pass through untouched.

use axum::http::uri::Authority;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{unix::SocketAddr, UnixListener, UnixStream};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a server may advertise: always safe to send.
const OUT_FRAME_MAX: usize = 16_384;
/// Frames larger than this are not buffered for inspection (the server refuses them anyway).
const IN_FRAME_MAX: usize = 16 << 20;
/// What replaces an `:authority` the server would refuse.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// The daemon's Unix listener: every accepted connection is wrapped in [`AuthorityFix`].
pub struct UnixGrpcListener(pub UnixListener);

impl axum::serve::Listener for UnixGrpcListener {
    type Io = AuthorityFix<UnixStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (AuthorityFix::new(stream), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

enum Mode {
    /// Not yet seen enough bytes to tell HTTP/2 from HTTP/1.
    Sniff,
    /// HTTP/2: frames are parsed and header blocks re-encoded.
    Rewrite,
    /// Anything else: bytes pass unchanged.
    Passthrough,
}

/// A header block being collected across HEADERS + CONTINUATION frames.
struct PendingBlock {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// A stream whose client-to-server HTTP/2 header blocks get a valid `:authority`.
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from `inner` and not yet turned into output.
    input: Vec<u8>,
    /// Bytes ready for the reader, from `out_pos` on.
    output: Vec<u8>,
    out_pos: usize,
    pending: Option<PendingBlock>,
    decoder: hpack::Decoder<'static>,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            mode: Mode::Sniff,
            input: Vec::new(),
            output: Vec::new(),
            out_pos: 0,
            pending: None,
            decoder: hpack::Decoder::new(),
            eof: false,
        }
    }

    /// Turns as much buffered input into output as complete frames allow.
    fn process(&mut self) -> io::Result<()> {
        if let Mode::Sniff = self.mode {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                self.mode = Mode::Passthrough;
            } else if n == PREFACE.len() {
                self.output.extend(self.input.drain(..n));
                self.mode = Mode::Rewrite;
            } else if self.eof {
                self.mode = Mode::Passthrough;
            }
        }
        match self.mode {
            Mode::Sniff => Ok(()),
            Mode::Passthrough => {
                self.output.append(&mut self.input);
                Ok(())
            }
            Mode::Rewrite => {
                while let Some(len) = self.complete_frame_len() {
                    let frame: Vec<u8> = self.input.drain(..FRAME_HEADER + len).collect();
                    self.on_frame(&frame)?;
                }
                if self.eof {
                    self.output.append(&mut self.input);
                }
                Ok(())
            }
        }
    }

    /// The payload length of the frame at the front of `input`, once all of it is there.
    fn complete_frame_len(&mut self) -> Option<usize> {
        if self.input.len() < FRAME_HEADER {
            return None;
        }
        let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]]) as usize;
        if len > IN_FRAME_MAX {
            // Too large to be a request we can help; let the server judge the raw bytes.
            self.mode = Mode::Passthrough;
            return None;
        }
        (self.input.len() >= FRAME_HEADER + len).then_some(len)
    }

    fn on_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let (kind, flags) = (frame[3], frame[4]);
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER..];
        match kind {
            HEADERS => {
                let (priority, fragment) = split_headers_payload(flags, payload)?;
                self.pending = Some(PendingBlock { stream_id, flags, priority, fragment: fragment.to_vec() });
            }
            CONTINUATION if self.pending.as_ref().is_some_and(|p| p.stream_id == stream_id) => {
                if let Some(pending) = self.pending.as_mut() {
                    pending.fragment.extend_from_slice(payload);
                }
            }
            _ if self.pending.is_some() => {
                return Err(invalid("HTTP/2 frame inside an unfinished header block"));
            }
            _ => {
                self.output.extend_from_slice(frame);
                return Ok(());
            }
        }
        if flags & END_HEADERS != 0 {
            if let Some(block) = self.pending.take() {
                self.emit_block(block)?;
            }
        }
        Ok(())
    }

    fn emit_block(&mut self, block: PendingBlock) -> io::Result<()> {
        let fields = self.decoder.decode(&block.fragment).map_err(|e| invalid(&format!("HPACK: {e:?}")))?;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        for (name, value) in &fields {
            let value = if name == b":authority" && Authority::try_from(value.as_slice()).is_err() {
                LOCAL_AUTHORITY
            } else {
                value.as_slice()
            };
            encode_literal(&mut encoded, name, value);
        }
        let mut rest = encoded.as_slice();
        let mut first = true;
        loop {
            let room = OUT_FRAME_MAX - if first && block.priority.is_some() { 5 } else { 0 };
            let (chunk, tail) = rest.split_at(rest.len().min(room));
            rest = tail;
            let mut flags = if rest.is_empty() { END_HEADERS } else { 0 };
            let (kind, priority) = if first {
                flags |= block.flags & END_STREAM;
                if block.priority.is_some() {
                    flags |= PRIORITY;
                }
                (HEADERS, block.priority.as_ref().map(|p| p.as_slice()).unwrap_or(&[]))
            } else {
                (CONTINUATION, &[][..])
            };
            let len = (priority.len() + chunk.len()) as u32;
            self.output.extend_from_slice(&len.to_be_bytes()[1..]);
            self.output.push(kind);
            self.output.push(flags);
            self.output.extend_from_slice(&block.stream_id.to_be_bytes());
            self.output.extend_from_slice(priority);
            self.output.extend_from_slice(chunk);
            first = false;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }
}

/// Strips padding and the priority fields from a HEADERS payload.
fn split_headers_payload(flags: u8, payload: &[u8]) -> io::Result<(Option<[u8; 5]>, &[u8])> {
    let mut body = payload;
    if flags & PADDED != 0 {
        let (&pad, rest) = body.split_first().ok_or_else(|| invalid("HEADERS frame too short"))?;
        let keep = rest.len().checked_sub(pad as usize).ok_or_else(|| invalid("HEADERS padding too long"))?;
        body = &rest[..keep];
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        if body.len() < 5 {
            return Err(invalid("HEADERS frame too short"));
        }
        let mut p = [0u8; 5];
        p.copy_from_slice(&body[..5]);
        priority = Some(p);
        body = &body[5..];
    }
    Ok((priority, body))
}

/// An HPACK "literal header field without indexing, new name" with raw (not Huffman) strings.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    for s in [name, value] {
        encode_integer(out, s.len(), 7, 0x00);
        out.extend_from_slice(s);
    }
}

/// HPACK integer representation (RFC 7541 section 5.1) with an `prefix_bits`-bit prefix.
fn encode_integer(out: &mut Vec<u8>, mut value: usize, prefix_bits: u32, first_byte_flags: u8) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first_byte_flags | value as u8);
        return;
    }
    out.push(first_byte_flags | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_pos < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.out_pos);
                buf.put_slice(&this.output[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.output.len() {
                    this.output.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if matches!(this.mode, Mode::Passthrough) && this.input.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 16 << 10];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
            }
            this.input.extend_from_slice(read.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    async fn through_fix(input: Vec<u8>) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut fixed = AuthorityFix::new(server);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.expect("read");
        out
    }

    fn request(authority: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":path".to_vec(), b"/forkd.v1.Daemon/Status".to_vec()),
            (b":authority".to_vec(), authority.to_vec()),
            (b"te".to_vec(), b"trailers".to_vec()),
        ]
    }

    #[tokio::test]
    async fn socket_path_authority_becomes_localhost_and_the_rest_survives() {
        let mut encoder = hpack::Encoder::new();
        let first = request(b"%2Frun%2Fforkd%2Fforkd.sock");
        let second = request(b"/run/forkd/forkd.sock");
        let encode =
            |e: &mut hpack::Encoder, h: &[(Vec<u8>, Vec<u8>)]| e.encode(h.iter().map(|(n, v)| (&n[..], &v[..])));
        let block1 = encode(&mut encoder, &first);
        let block2 = encode(&mut encoder, &second);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS, 1, &block1));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0")); // DATA
                                                                // The second request split across HEADERS (padded) and CONTINUATION.
        let (a, b) = block2.split_at(block2.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | END_STREAM, 3, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));

        let out = through_fix(input).await;
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut frames = Vec::new();
        let mut rest = &out[PREFACE.len()..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            frames.push(rest[..FRAME_HEADER + len].to_vec());
            rest = &rest[FRAME_HEADER + len..];
        }
        assert_eq!(frames.len(), 4, "SETTINGS, HEADERS, DATA, HEADERS");
        let mut decoder = hpack::Decoder::new();
        for (i, stream) in [(1usize, 1u8), (3, 3)] {
            let f = &frames[i];
            assert_eq!(f[3], HEADERS);
            assert_eq!(f[8], stream);
            assert_ne!(f[4] & END_HEADERS, 0);
            let fields = decoder.decode(&f[FRAME_HEADER..]).expect("decodes");
            assert_eq!(fields, request(b"localhost"));
        }
        assert_ne!(frames[3][4] & END_STREAM, 0, "END_STREAM kept");
    }

    #[tokio::test]
    async fn valid_authority_is_kept() {
        let mut encoder = hpack::Encoder::new();
        let fields = request(b"localhost:50051");
        let block = encoder.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | PRIORITY, 1, &[[0, 0, 0, 0, 16].as_slice(), &block].concat()));
        let out = through_fix(input).await;
        let f = &out[PREFACE.len()..];
        assert_ne!(f[4] & PRIORITY, 0);
        let decoded = hpack::Decoder::new().decode(&f[FRAME_HEADER + 5..]).expect("decodes");
        assert_eq!(decoded, fields);
    }

    #[tokio::test]
    async fn http1_passes_through_unchanged() {
        let request = b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec();
        assert_eq!(through_fix(request.clone()).await, request);
    }

    #[test]
    fn integers_use_continuation_bytes_past_the_prefix() {
        let mut out = Vec::new();
        encode_integer(&mut out, 1337, 5, 0);
        assert_eq!(out, [31, 154, 10]);
    }
}
