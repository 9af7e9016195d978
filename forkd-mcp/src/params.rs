//! Tool arguments. Field docs become the JSON schema descriptions a model reads, so they say
//! what a value does and what the default is.

use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Root filesystem image to boot (default "default": Debian with python3; "tiny" is a
    /// minimal busybox image). Ignored with `template` or `snapshot`.
    pub image: Option<String>,
    /// Guest memory, e.g. "512M" or "2G" (default 256M).
    pub memory: Option<String>,
    /// Number of vCPUs (default 1).
    pub vcpus: Option<u8>,
    /// "none" (default: no network device) or "nat" (own namespace; outbound traffic denied
    /// except to `allow`).
    pub network: Option<String>,
    /// With network "nat": destinations the sandbox may reach, as "CIDR" or "CIDR:PORT"
    /// (e.g. "1.1.1.1/32:443"), or "allow-all".
    #[serde(default)]
    pub allow: Vec<String>,
    /// Fork this named template (a booted sandbox kept ready) instead of booting: milliseconds
    /// instead of seconds.
    pub template: Option<String>,
    /// Start from this snapshot (tag or id): the sandboxes continue where it stopped.
    pub snapshot: Option<String>,
    /// How many sandboxes (default 1). More than one needs `snapshot` or `template`, or boots
    /// one and branches the rest from it.
    pub count: Option<u32>,
    /// Remove these sandboxes when this MCP session ends (default: the server's --cleanup).
    pub remove_on_session_end: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxRef {
    /// Sandbox id, e.g. "sb-1a2b3c4d5e6f".
    pub id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KillSandbox {
    /// Sandbox id to remove.
    pub id: Option<String>,
    /// More sandbox ids to remove in the same call.
    #[serde(default)]
    pub ids: Vec<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecCommand {
    /// Sandbox id.
    pub id: String,
    /// Program and arguments, e.g. ["ls", "-la", "/"]. Use ["sh", "-c", "..."] for pipes and
    /// shell syntax.
    pub command: Vec<String>,
    /// Text fed to the command's standard input.
    pub stdin: Option<String>,
    /// Kill the command after this many seconds (exit code 124); default 60.
    pub timeout_secs: Option<f64>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest (default /root).
    pub cwd: Option<String>,
    /// Most bytes of stdout and of stderr returned (default and ceiling: the server's
    /// --max-output, 16 KiB); longer output is cut in the middle with a marker.
    pub max_output_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalCode {
    /// Sandbox id (its image needs python3, like the "default" image).
    pub id: String,
    /// Python code. Variables, imports and functions persist in the context between calls;
    /// the value of a final expression is returned.
    pub code: String,
    /// Context name (default "main"); separate contexts do not share state.
    pub context: Option<String>,
    /// Interrupt the code after this many seconds (KeyboardInterrupt; the context keeps its
    /// state). Default 60.
    pub timeout_secs: Option<f64>,
    /// Most bytes of printed output returned per stream (default: the server's --max-output).
    pub max_output_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFile {
    /// Sandbox id.
    pub id: String,
    /// Absolute path in the guest.
    pub path: String,
    /// Most bytes returned (default 1 MiB); a longer file is refused, read it in parts with
    /// exec_command (e.g. head/tail/sed).
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFile {
    /// Sandbox id.
    pub id: String,
    /// Absolute path in the guest; parent directories are created.
    pub path: String,
    /// The file's new content (text).
    pub content: String,
    /// Permission bits as an octal string, e.g. "755" (default "644").
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListDir {
    /// Sandbox id.
    pub id: String,
    /// Absolute directory path in the guest (default "/root").
    pub path: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BranchSandbox {
    /// The running sandbox to fork; it keeps running, paused only for about a millisecond.
    pub id: String,
    /// Number of children (default 1). Each continues from the same memory, files and
    /// processes and diverges independently.
    pub count: Option<u32>,
    /// Remove the children when this MCP session ends (default: the server's --cleanup).
    pub remove_on_session_end: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// The sandbox to snapshot; it keeps running.
    pub id: String,
    /// A name to restore it by ([a-z0-9][a-z0-9._-]*, unique).
    pub tag: Option<String>,
    /// Write only pages changed since the sandbox's previous snapshot (smaller, faster).
    #[serde(default)]
    pub diff: bool,
    /// Return only once the snapshot is on disk (default true).
    pub wait: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreSnapshot {
    /// Snapshot tag or id (list_snapshots).
    pub snapshot: String,
    /// How many sandboxes to start from it (default 1).
    pub count: Option<u32>,
    /// Remove them when this MCP session ends (default: the server's --cleanup).
    pub remove_on_session_end: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitForText {
    /// Sandbox id.
    pub id: String,
    /// The text to wait for (plain substring, case-sensitive).
    pub text: String,
    /// Watch this command's output (e.g. ["tail", "-F", "/var/log/app.log"]); it is stopped
    /// when the text appears. Without it, the guest console is watched.
    pub command: Option<Vec<String>>,
    /// Give up after this many seconds (default 30, at most 600).
    pub timeout_secs: Option<f64>,
}
