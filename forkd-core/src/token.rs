//! Bearer tokens for the network listeners (the daemon's TCP port, `forkd-mcp --http`): read
//! from a file the operator made, compared in constant time.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Shortest token accepted; anything shorter is guessable.
pub const MIN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} must hold one token of at least {MIN_LEN} printable characters (e.g. `openssl rand -hex 32 > {path}`)"
    )]
    Malformed { path: PathBuf },
}

/// A secret a client must present as `Authorization: Bearer <token>`.
#[derive(Clone)]
pub struct BearerToken(Vec<u8>);

impl BearerToken {
    /// The file's content without surrounding whitespace. Warns when other users can read it.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| TokenError::Read { path: path.to_path_buf(), source })?;
        let token = Self::parse(&text).ok_or_else(|| TokenError::Malformed { path: path.to_path_buf() })?;
        if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
            tracing::warn!("{} is readable by other users; chmod 600 it", path.display());
        }
        Ok(token)
    }

    /// One token of at least [`MIN_LEN`] printable characters, surrounding whitespace ignored.
    pub fn parse(text: &str) -> Option<Self> {
        let token = text.trim();
        let printable = token.chars().all(|c| !c.is_whitespace() && !c.is_control());
        (token.len() >= MIN_LEN && printable).then(|| Self(token.as_bytes().to_vec()))
    }

    pub fn as_str(&self) -> &str {
        // Built from a &str in `parse`.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Whether an `Authorization` header value carries this token. Takes the same time
    /// wherever the first difference is.
    pub fn authorizes(&self, header: Option<&[u8]>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")).map(|t| t.trim_ascii()) else {
            return false;
        };
        given.len() == self.0.len() && given.iter().zip(&self.0).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_or_spaced_tokens_are_refused() {
        assert!(BearerToken::parse("short").is_none());
        assert!(BearerToken::parse("0123456789abcdef 0123").is_none());
        assert!(BearerToken::parse("  0123456789abcdef\n").is_some());
    }

    #[test]
    fn only_the_exact_bearer_header_authorizes() {
        let t = BearerToken::parse("0123456789abcdef").unwrap();
        assert!(t.authorizes(Some(b"Bearer 0123456789abcdef")));
        assert!(!t.authorizes(Some(b"Bearer 0123456789abcdeX")));
        assert!(!t.authorizes(Some(b"Bearer 0123456789abcdef0")));
        assert!(!t.authorizes(Some(b"0123456789abcdef")));
        assert!(!t.authorizes(None));
    }

    #[test]
    fn files_are_read_and_errors_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        assert!(matches!(BearerToken::from_file(&path), Err(TokenError::Read { .. })));
        std::fs::write(&path, "x\n").unwrap();
        let err = BearerToken::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("openssl rand"), "{err}");
        std::fs::write(&path, "0123456789abcdef\n").unwrap();
        assert_eq!(BearerToken::from_file(&path).unwrap().as_str(), "0123456789abcdef");
    }
}
