//! A Rust client for the daemon: connects over the Unix socket or TCP (with a bearer token)
//! and hands out the generated gRPC clients.
//!
//! ```no_run
//! # async fn doc() -> Result<(), forkd_daemon::client::ClientError> {
//! use forkd_daemon::client::{pb, Client, Target};
//! let client = Client::connect(&Target::from_env()).await?;
//! let sandbox = client.sandboxes().create(pb::CreateRequest::default()).await?.into_inner();
//! let (exit, stdout, _) = client.exec(&sandbox.id, ["uname", "-a"]).await?;
//! # Ok(()) }
//! ```

use crate::convert::{MAX_MESSAGE_BYTES, RETRY_AFTER_MS};
pub use forkd_proto::v1 as pb;
use forkd_proto::v1::{daemon_client::DaemonClient, images_client::ImagesClient, sandboxes_client::SandboxesClient};
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
        Target::Unix(
            std::env::var_os(crate::SOCKET_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(crate::DEFAULT_SOCKET)),
        )
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

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the forkd daemon at {target}: {reason}")]
    Connect { target: String, reason: String },
    /// The daemon answered with an error; `message` is its explanation.
    #[error("{message}")]
    Api { code: tonic::Code, message: String, retry_after_ms: Option<u64> },
}

impl ClientError {
    pub fn code(&self) -> tonic::Code {
        match self {
            ClientError::Connect { .. } => tonic::Code::Unavailable,
            ClientError::Api { code, .. } => *code,
        }
    }

    /// For RESOURCE_EXHAUSTED: how long the daemon suggests waiting.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Api { retry_after_ms: Some(ms), .. } => Some(Duration::from_millis(*ms)),
            _ => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        let retry_after_ms =
            s.metadata().get(RETRY_AFTER_MS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let message = if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_string() };
        ClientError::Api { code: s.code(), message, retry_after_ms }
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
pub struct Client {
    channel: Channel,
    auth: Auth,
}

impl Client {
    /// Connects (eagerly: an unreachable daemon is an error here, within 5 s).
    pub async fn connect(target: &Target) -> Result<Self, ClientError> {
        let fail =
            |e: &dyn std::fmt::Display| ClientError::Connect { target: target.to_string(), reason: e.to_string() };
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
            Some(t) => Auth(Some(format!("Bearer {t}").parse().map_err(|_| fail(&"the token is not valid ASCII"))?)),
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

    pub fn images(&self) -> ImagesClient<Transport> {
        ImagesClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn daemon(&self) -> DaemonClient<Transport> {
        DaemonClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// Runs a command and collects its output: (exit, stdout, stderr).
    pub async fn exec<I, S>(&self, id: &str, args: I) -> Result<(pb::ExecExit, Vec<u8>, Vec<u8>), ClientError>
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

    /// Like [`Client::exec`] with a full request.
    pub async fn exec_request(&self, req: pb::ExecRequest) -> Result<(pb::ExecExit, Vec<u8>, Vec<u8>), ClientError> {
        let mut stream = self.sandboxes().exec(req).await?.into_inner();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(event) = stream.message().await? {
            match event.event {
                Some(pb::exec_event::Event::Stdout(d)) => stdout.extend_from_slice(&d),
                Some(pb::exec_event::Event::Stderr(d)) => stderr.extend_from_slice(&d),
                Some(pb::exec_event::Event::Exit(exit)) => return Ok((exit, stdout, stderr)),
                None => {}
            }
        }
        Err(ClientError::Api {
            code: tonic::Code::Internal,
            message: "the exec stream ended without an exit status".into(),
            retry_after_ms: None,
        })
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
