//! Bridges between the blocking controller (which reads from `Read` and writes to `Write` /
//! `ExecSink`) and async streams. Every bridge notices a client that went away: a send into a
//! closed channel fails, which stops the blocking side.

use bytes::Bytes;
use forkd_core::{CancelToken, Error, ExecSink, OutputStream};
use forkd_proto::v1 as pb;
use std::io::{self, Read, Write};
use tokio::sync::mpsc;

/// Largest chunk sent to a client.
pub const CHUNK: usize = 64 << 10;

/// Runs a blocking controller call on the blocking pool; a panic in it is an internal error,
/// never a crash of the daemon.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(Error::internal(format!("worker failed: {e}"))))
}

/// Cancels a token when dropped: a handler future dropped because its client went away
/// stops the command it started.
pub struct CancelOnDrop(pub CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Streams a command's (or snippet's) output as stream events `T`; a closed channel (client
/// gone) cancels it.
pub struct ChannelSink<T> {
    pub tx: mpsc::Sender<Result<T, tonic::Status>>,
    pub cancel: CancelToken,
    /// The event carrying one chunk of output.
    pub event: fn(OutputStream, Vec<u8>) -> T,
}

impl<T: Send> ExecSink for ChannelSink<T> {
    fn output(&mut self, stream: OutputStream, data: &[u8]) {
        if self.cancel.is_cancelled() {
            return;
        }
        for chunk in data.chunks(CHUNK) {
            if self.tx.blocking_send(Ok((self.event)(stream, chunk.to_vec()))).is_err() {
                self.cancel.cancel();
                return;
            }
        }
    }
}

/// An exec's output chunk.
pub fn exec_output(stream: OutputStream, data: Vec<u8>) -> pb::ExecEvent {
    let event = match stream {
        OutputStream::Stdout => pb::exec_event::Event::Stdout(data),
        OutputStream::Stderr => pb::exec_event::Event::Stderr(data),
    };
    pb::ExecEvent { event: Some(event) }
}

/// A snippet's output chunk.
pub fn eval_output(stream: OutputStream, data: Vec<u8>) -> pb::EvalEvent {
    let event = match stream {
        OutputStream::Stdout => pb::eval_event::Event::Stdout(data),
        OutputStream::Stderr => pb::eval_event::Event::Stderr(data),
    };
    pb::EvalEvent { event: Some(event) }
}

/// Collects output up to a limit per stream (REST answers with the whole output at once).
pub struct BoundedCapture {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub limit: usize,
    pub truncated: bool,
}

impl BoundedCapture {
    pub fn new(limit: usize) -> Self {
        Self { stdout: Vec::new(), stderr: Vec::new(), limit, truncated: false }
    }
}

impl ExecSink for BoundedCapture {
    fn output(&mut self, stream: OutputStream, data: &[u8]) {
        let buf = match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        };
        let room = self.limit.saturating_sub(buf.len());
        if data.len() > room {
            self.truncated = true;
        }
        buf.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// A `Read` over chunks arriving on a channel (an upload stream).
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    buf: Bytes,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self { rx, buf: Bytes::new() }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.buf = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

/// A `Write` that sends what it is given as `FileChunk`s.
pub struct ChunkWriter {
    pub tx: mpsc::Sender<Result<pb::FileChunk, tonic::Status>>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK);
        self.tx
            .blocking_send(Ok(pb::FileChunk { data: data[..n].to_vec() }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A `Write` into memory with a cap (REST file downloads).
pub struct BoundedBuffer {
    pub data: Vec<u8>,
    pub limit: usize,
}

impl Write for BoundedBuffer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.data.len() + data.len() > self.limit {
            return Err(io::Error::other(format!(
                "the file is larger than {} MiB; use the gRPC ReadFile stream",
                self.limit >> 20
            )));
        }
        self.data.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_reader_reads_chunks_then_eof_or_error() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(Bytes::from_static(b"hello "))).unwrap();
        tx.try_send(Ok(Bytes::from_static(b"world"))).unwrap();
        drop(tx);
        let mut s = String::new();
        ChannelReader::new(rx).read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello world");
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(Bytes::from_static(b"x"))).unwrap();
        tx.try_send(Err(io::Error::other("client gone"))).unwrap();
        assert!(ChannelReader::new(rx).read_to_end(&mut Vec::new()).is_err());
    }

    #[test]
    fn capture_is_bounded() {
        let mut c = BoundedCapture::new(4);
        c.output(OutputStream::Stdout, b"abc");
        c.output(OutputStream::Stdout, b"def");
        c.output(OutputStream::Stderr, b"ok");
        assert_eq!((c.stdout.as_slice(), c.stderr.as_slice(), c.truncated), (&b"abcd"[..], &b"ok"[..], true));
    }

    #[test]
    fn a_closed_channel_cancels_the_command() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let cancel = CancelToken::new();
        let mut sink = ChannelSink { tx, cancel: cancel.clone(), event: exec_output };
        sink.output(OutputStream::Stdout, b"x");
        assert!(cancel.is_cancelled());
    }
}
