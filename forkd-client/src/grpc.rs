//! The daemon's gRPC API from async Rust: a [`Connection`] over the Unix socket or TCP (with a
//! bearer token) that hands out the generated clients, with errors as forkd-core's.
//!
//! ```no_run
//! # async fn doc() -> forkd_core::Result<()> {
//! use forkd_client::grpc::{pb, Connection, Target};
//! let daemon = Connection::connect(&Target::from_env()).await?;
//! let sandbox = daemon.sandboxes().create(pb::CreateRequest::default()).await.map_err(|s| forkd_proto::convert::error(&s))?;
//! let (exit, stdout, _) = daemon.exec(&sandbox.into_inner().id, ["uname", "-a"]).await?;
//! # Ok(()) }
//! ```

use forkd_core::Error;
use forkd_proto::convert::{self, MAX_MESSAGE_BYTES};
pub use forkd_proto::v1 as pb;
use forkd_proto::v1::{
    daemon_client::DaemonClient, images_client::ImagesClient, sandboxes_client::SandboxesClient,
    snapshots_client::SnapshotsClient,
};
use std::path::PathBuf;
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Where the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Tcp {
        /// `host:port`
        addr: String,
        token: Option<String>,
    },
}

impl Target {
    /// `$FORKD_SOCKET`, else the default socket.
    pub fn from_env() -> Self {
        Target::Unix(forkd_core::dirs::default_socket())
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "{}", p.display()),
            Target::Tcp { addr, .. } => write!(f, "tcp://{addr}"),
        }
    }
}

/// Adds the bearer token to every call.
#[derive(Clone, Default)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Transport = InterceptedService<Channel, Auth>;

/// A connection to the daemon. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct Connection {
    channel: Channel,
    auth: Auth,
}

/// A status as the forkd error it carries.
pub fn error(status: tonic::Status) -> Error {
    convert::error(&status)
}

impl Connection {
    /// Connects (eagerly: an unreachable daemon is `Unavailable` here, within 5 s).
    pub async fn connect(target: &Target) -> Result<Self, Error> {
        let fail = |e: &dyn std::fmt::Display| Error::Unavailable(format!("no forkd daemon answers at {target}: {e}"));
        let (channel, token) = match target {
            Target::Unix(path) => {
                let path = path.clone();
                let endpoint = Endpoint::from_static("http://forkd.sock").connect_timeout(Duration::from_secs(5));
                let channel = endpoint
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
                    .map_err(|e| fail(&source_chain(&e)))?;
                (channel, None)
            }
            Target::Tcp { addr, token } => {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| fail(&e))?
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true);
                (endpoint.connect().await.map_err(|e| fail(&source_chain(&e)))?, token.clone())
            }
        };
        let auth = match token {
            Some(t) => Auth(Some(
                format!("Bearer {t}").parse().map_err(|_| Error::invalid("token", "must be printable ASCII"))?,
            )),
            None => Auth(None),
        };
        Ok(Self { channel, auth })
    }

    /// The underlying channel, for calls the generated clients do not cover (without the
    /// bearer token: add it yourself on TCP).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn sandboxes(&self) -> SandboxesClient<Transport> {
        let limit = MAX_MESSAGE_BYTES + (64 << 10);
        SandboxesClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }

    pub fn snapshots(&self) -> SnapshotsClient<Transport> {
        SnapshotsClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn images(&self) -> ImagesClient<Transport> {
        ImagesClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn daemon(&self) -> DaemonClient<Transport> {
        DaemonClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// Runs a command and collects its output: (exit, stdout, stderr).
    pub async fn exec<I, S>(&self, id: &str, args: I) -> Result<(pb::ExecExit, Vec<u8>, Vec<u8>), Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let req = pb::ExecRequest {
            id: id.to_string(),
            args: args.into_iter().map(Into::into).collect(),
            ..Default::default()
        };
        self.exec_request(req).await
    }

    /// Like [`Connection::exec`] with a full request.
    pub async fn exec_request(&self, req: pb::ExecRequest) -> Result<(pb::ExecExit, Vec<u8>, Vec<u8>), Error> {
        let mut stream = self.sandboxes().exec(req).await.map_err(error)?.into_inner();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(event) = stream.message().await.map_err(error)? {
            match event.event {
                Some(pb::exec_event::Event::Stdout(d)) => stdout.extend_from_slice(&d),
                Some(pb::exec_event::Event::Stderr(d)) => stderr.extend_from_slice(&d),
                Some(pb::exec_event::Event::Exit(exit)) => return Ok((exit, stdout, stderr)),
                None => {}
            }
        }
        Err(Error::internal("the exec stream ended without an exit status"))
    }
}

/// An error with its causes, `a: b: c` (tonic's transport errors hide the useful part).
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        cur = s.source();
    }
    text
}
