//! The gRPC services (forkd.v1 Sandboxes, Snapshots, Images, Daemon) over [`Shared`].

use crate::api::Shared;
use crate::bridge::{blocking, eval_output, exec_output, ChannelReader, ChannelSink, ChunkWriter};
use bytes::Bytes;
use forkd_core::{CancelToken, Error};
use forkd_proto::convert;
use forkd_proto::v1 as pb;
use std::io::{self, Read};
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// The gRPC front end. Cheap to clone.
#[derive(Clone)]
pub struct Grpc(pub Arc<Shared>);

type Reply<T> = Result<Response<T>, Status>;

impl std::ops::Deref for Grpc {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Grpc {
    fn id(&self, text: &str) -> Result<forkd_core::SandboxId, Status> {
        self.0.id(text).map_err(|e| convert::status(&e))
    }
}

fn st(e: Error) -> Status {
    convert::status(&e)
}

/// Runs `work` (a command or a snippet) on the blocking pool, streaming its output as events
/// made by `event` and then its last event; the client going away (the stream dropped)
/// cancels it.
fn stream_output<T: Send + 'static>(
    shared: &Arc<crate::api::Shared>,
    event: fn(forkd_core::OutputStream, Vec<u8>) -> T,
    work: impl FnOnce(&mut ChannelSink<T>, &CancelToken) -> Result<T, Error> + Send + 'static,
) -> ReceiverStream<Result<T, Status>> {
    let (tx, rx) = mpsc::channel(64);
    let shared = shared.clone();
    tokio::spawn(async move {
        let _counted = shared.metrics.exec_started();
        let cancel = CancelToken::new();
        let watcher = {
            let (tx, cancel) = (tx.clone(), cancel.clone());
            tokio::spawn(async move {
                tx.closed().await;
                cancel.cancel();
            })
        };
        let mut sink = ChannelSink { tx: tx.clone(), cancel: cancel.clone(), event };
        let result = blocking(move || work(&mut sink, &cancel)).await;
        watcher.abort();
        let _ = tx.send(result.map_err(|e| shared.status(e))).await;
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl pb::sandboxes_server::Sandboxes for Grpc {
    async fn create(&self, req: Request<pb::CreateRequest>) -> Reply<pb::Sandbox> {
        let plan = convert::create_plan(req.into_inner()).map_err(|e| self.status(e))?;
        let info = self.0.create(plan).await.map_err(st)?;
        Ok(Response::new(convert::sandbox(&info, None)))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Reply<pb::Sandbox> {
        let req = req.into_inner();
        let id = self.id(&req.id)?;
        let (info, memory) = self.0.get(id.clone(), req.include_memory).await.map_err(st)?;
        let mut sandbox = convert::sandbox(&info, memory);
        if req.include_memory {
            sandbox.resources = self.0.resources(id).await.as_ref().map(convert::resources_to_pb);
        }
        Ok(Response::new(sandbox))
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Reply<pb::ListResponse> {
        let list = self.0.list(req.into_inner().include_memory).await;
        Ok(Response::new(pb::ListResponse { sandboxes: list.iter().map(|(i, m)| convert::sandbox(i, *m)).collect() }))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Reply<pb::DeleteResponse> {
        let id = self.id(&req.into_inner().id)?;
        self.0.delete(id).await.map_err(st)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    type ExecStream = ReceiverStream<Result<pb::ExecEvent, Status>>;

    async fn exec(&self, req: Request<pb::ExecRequest>) -> Reply<Self::ExecStream> {
        let r = req.into_inner();
        let id = self.id(&r.id)?;
        let exec = convert::exec_request(r.args, r.env, r.cwd, r.timeout_secs).map_err(|e| self.status(e))?;
        self.exists(&id).map_err(st)?;
        let stdin = r.stdin.map(|b| Box::new(io::Cursor::new(b)) as Box<dyn Read + Send>);
        let c = self.0.controller.clone();
        let stream = stream_output(&self.0, exec_output, move |sink, cancel| {
            let outcome = c.exec_with_cancel(&id, &exec, stdin, sink, cancel)?;
            Ok(pb::ExecEvent { event: Some(pb::exec_event::Event::Exit(convert::exec_exit(&outcome))) })
        });
        Ok(Response::new(stream))
    }

    type EvalStream = ReceiverStream<Result<pb::EvalEvent, Status>>;

    async fn eval(&self, req: Request<pb::EvalRequest>) -> Reply<Self::EvalStream> {
        let r = req.into_inner();
        let id = self.id(&r.id)?;
        let eval = convert::eval_request(r).map_err(|e| self.status(e))?;
        self.exists(&id).map_err(st)?;
        let c = self.0.controller.clone();
        let stream = stream_output(&self.0, eval_output, move |sink, cancel| {
            let result = c.eval(&id, &eval, sink, cancel)?;
            Ok(pb::EvalEvent { event: Some(pb::eval_event::Event::Result(convert::eval_result(&result))) })
        });
        Ok(Response::new(stream))
    }

    async fn list_contexts(&self, req: Request<pb::ListContextsRequest>) -> Reply<pb::ListContextsResponse> {
        let id = self.id(&req.into_inner().id)?;
        let contexts = self.0.contexts(id).await.map_err(st)?;
        Ok(Response::new(pb::ListContextsResponse { contexts: contexts.iter().map(convert::context_info).collect() }))
    }

    async fn close_context(&self, req: Request<pb::CloseContextRequest>) -> Reply<pb::CloseContextResponse> {
        let r = req.into_inner();
        let id = self.id(&r.id)?;
        self.0.close_context(id, r.name).await.map_err(st)?;
        Ok(Response::new(pb::CloseContextResponse {}))
    }

    async fn write_file(&self, req: Request<Streaming<pb::WriteFileRequest>>) -> Reply<pb::WriteFileResponse> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| self.status(Error::invalid("path", "the stream ended before the first message")))?;
        let id = self.id(&first.id)?;
        if first.path.is_empty() {
            return Err(self.status(Error::invalid("path", "required in the first message")));
        }
        self.exists(&id).map_err(st)?;
        let mode = if first.mode == 0 { 0o644 } else { first.mode & 0o7777 };
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(16);
        let forward = tokio::spawn(async move {
            if !first.data.is_empty() && tx.send(Ok(Bytes::from(first.data))).await.is_err() {
                return;
            }
            loop {
                match stream.message().await {
                    Ok(Some(m)) if m.data.is_empty() => {}
                    Ok(Some(m)) => {
                        if tx.send(Ok(Bytes::from(m.data))).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let _ =
                            tx.send(Err(io::Error::other(format!("upload stream failed: {}", status.message())))).await;
                        return;
                    }
                }
            }
        });
        let c = self.controller.clone();
        let path = first.path;
        let written = blocking(move || c.write_file(&id, &path, mode, &mut ChannelReader::new(rx))).await;
        forward.abort();
        let n = written.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::WriteFileResponse { bytes_written: n }))
    }

    type ReadFileStream = ReceiverStream<Result<pb::FileChunk, Status>>;

    async fn read_file(&self, req: Request<pb::ReadFileRequest>) -> Reply<Self::ReadFileStream> {
        let r = req.into_inner();
        let id = self.id(&r.id)?;
        self.exists(&id).map_err(st)?;
        let (tx, rx) = mpsc::channel(16);
        let shared = self.0.clone();
        tokio::spawn(async move {
            let c = shared.controller.clone();
            let writer = ChunkWriter { tx: tx.clone() };
            let result = blocking(move || {
                let mut writer = writer;
                c.read_file(&id, &r.path, &mut writer)
            })
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(shared.status(e))).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_dir(&self, req: Request<pb::ListDirRequest>) -> Reply<pb::ListDirResponse> {
        let r = req.into_inner();
        let id = self.id(&r.id)?;
        let entries = self.0.list_dir(id, r.path).await.map_err(st)?;
        Ok(Response::new(pb::ListDirResponse { entries: entries.iter().map(convert::dir_entry).collect() }))
    }

    async fn branch(&self, req: Request<pb::BranchRequest>) -> Reply<pb::BranchResponse> {
        let r = req.into_inner();
        let id = self.id(&r.id)?;
        let opts = convert::branch_options(r.count, convert::limits_from_pb(r.limits)).map_err(|e| self.status(e))?;
        let result = self.0.branch(id, opts).await.map_err(st)?;
        Ok(Response::new(pb::BranchResponse {
            source: result.source.to_string(),
            children: result.children.iter().map(|c| convert::sandbox(c, None)).collect(),
            pause_ms: result.pause.as_secs_f64() * 1000.0,
        }))
    }

    async fn get_console(&self, req: Request<pb::GetConsoleRequest>) -> Reply<pb::GetConsoleResponse> {
        let r = req.into_inner();
        let id = self.id(&r.id)?;
        let data = self.0.console(id, r.max_bytes).await.map_err(st)?;
        Ok(Response::new(pb::GetConsoleResponse { data }))
    }

    type WatchStream = ReceiverStream<Result<pb::Event, Status>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Reply<Self::WatchStream> {
        let r = req.into_inner();
        let filter = if r.id.is_empty() { None } else { Some(self.id(&r.id)?) };
        // Subscribe before answering: once the client has the response, it sees every event.
        let mut events = self.events.subscribe();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
                    event = events.recv() => match event {
                        Ok(e) => {
                            if filter.as_ref().is_none_or(|id| e.concerns(id))
                                && tx.send(Ok(convert::event(&e))).await.is_err()
                            {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let _ = tx
                                .send(Err(Status::aborted(format!(
                                    "this watcher fell {n} events behind; List and Watch again"
                                ))))
                                .await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for Grpc {
    async fn create(&self, req: Request<pb::CreateSnapshotRequest>) -> Reply<pb::SnapshotResult> {
        let r = req.into_inner();
        let id = self.id(&r.id)?;
        let opts =
            forkd_core::SnapshotOptions { tag: (!r.tag.is_empty()).then_some(r.tag), diff: r.diff, wait: r.wait };
        let result = self.0.snapshot(id, opts).await.map_err(st)?;
        Ok(Response::new(convert::snapshot_result(&result)))
    }

    async fn list(&self, _: Request<pb::ListSnapshotsRequest>) -> Reply<pb::ListSnapshotsResponse> {
        let list = self.0.snapshots().await.map_err(st)?;
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots: list.iter().map(convert::snapshot_info).collect() }))
    }

    async fn get(&self, req: Request<pb::GetSnapshotRequest>) -> Reply<pb::SnapshotInfo> {
        let info = self.0.snapshot_info(req.into_inner().tag).await.map_err(st)?;
        Ok(Response::new(convert::snapshot_info(&info)))
    }

    async fn delete(&self, req: Request<pb::DeleteSnapshotRequest>) -> Reply<pb::DeleteSnapshotResponse> {
        let r = req.into_inner();
        let removed = self.0.remove_snapshot(r.tag, r.cascade).await.map_err(st)?;
        Ok(Response::new(pb::DeleteSnapshotResponse { removed }))
    }

    async fn compact(&self, req: Request<pb::CompactSnapshotRequest>) -> Reply<pb::SnapshotInfo> {
        let info = self.0.compact_snapshot(req.into_inner().tag).await.map_err(st)?;
        Ok(Response::new(convert::snapshot_info(&info)))
    }

    async fn verify(&self, req: Request<pb::VerifySnapshotRequest>) -> Reply<pb::VerifySnapshotResponse> {
        let report = self.0.verify_snapshot(req.into_inner().tag).await.map_err(st)?;
        Ok(Response::new(convert::verify_report(&report)))
    }

    async fn restore(&self, req: Request<pb::RestoreRequest>) -> Reply<pb::RestoreResponse> {
        let r = req.into_inner();
        let count = convert::restore_count(r.count).map_err(|e| self.status(e))?;
        let sandboxes = self.0.restore(r.snapshot_tag, count).await.map_err(st)?;
        Ok(Response::new(pb::RestoreResponse {
            sandboxes: sandboxes.iter().map(|s| convert::sandbox(s, None)).collect(),
        }))
    }
}

#[tonic::async_trait]
impl pb::images_server::Images for Grpc {
    async fn list(&self, _: Request<pb::ListImagesRequest>) -> Reply<pb::ListImagesResponse> {
        let images = self.0.images().await.map_err(st)?;
        Ok(Response::new(pb::ListImagesResponse { images: images.iter().map(convert::image).collect() }))
    }
}

#[tonic::async_trait]
impl pb::daemon_server::Daemon for Grpc {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Reply<pb::InfoResponse> {
        Ok(Response::new(self.0.info()))
    }
}
