//! `WriteFile`, `ReadFile`, `ListDir`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use forkd_agent::proto::{
    request, response, Data, DirEntries, DirEntry, Empty, ErrorKind, FileEnd, FileType, WriteDone, WriteFileRequest,
    FILE_CHUNK,
};

use super::{frame_error_message, io_error, Conn};

/// Entries per `DirEntries` frame: keeps frames far below the size limit.
const DIR_BATCH: usize = 1024;

fn check_absolute(conn: &mut Conn, path: &str) -> io::Result<bool> {
    if path.starts_with('/') && !path.contains('\0') {
        return Ok(true);
    }
    conn.send_error(
        ErrorKind::InvalidArgument,
        format!("path must be absolute (start with /) and contain no NUL: {path:?}"),
    )?;
    Ok(false)
}

/// Receives the chunks of a `WriteFile` into the file. On a local error it keeps
/// consuming chunks until `FileEnd` so the client can finish sending and then read the
/// error (instead of failing with a broken pipe).
pub fn write_file(conn: &mut Conn, req: WriteFileRequest) -> io::Result<()> {
    // Still drain the stream on a bad path, so the client gets the error.
    let mut failure: Option<(ErrorKind, String)> = None;
    if !req.path.starts_with('/') || req.path.contains('\0') {
        failure = Some((
            ErrorKind::InvalidArgument,
            format!("path must be absolute (start with /) and contain no NUL: {:?}", req.path),
        ));
    }
    let mode = if req.mode == 0 { 0o644 } else { req.mode & 0o7777 };
    let mut file: Option<File> = None;
    if failure.is_none() {
        let path = Path::new(&req.path);
        if req.create_parents {
            if let Some(parent) = path.parent() {
                if let Err(e) = fs::create_dir_all(parent) {
                    failure = Some(io_error(&e, "creating parent directories of", &req.path));
                }
            }
        }
        if failure.is_none() {
            match OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path) {
                Ok(f) => file = Some(f),
                Err(e) => {
                    let (k, mut m) = io_error(&e, "opening for writing", &req.path);
                    if k == ErrorKind::NotFound && !req.create_parents {
                        m.push_str(" (the parent directory is missing; set create_parents)");
                    }
                    failure = Some((k, m));
                }
            }
        }
    }

    let mut written = 0u64;
    loop {
        let body = match conn.recv() {
            Ok(Some(r)) => r.body,
            // Client gone: leave what was written.
            Ok(None) => return Ok(()),
            Err(e) => {
                return conn.send_error(ErrorKind::Protocol, frame_error_message(&e));
            }
        };
        match body {
            Some(request::Body::FileChunk(d)) => {
                if let Some(f) = file.as_mut() {
                    if let Err(e) = f.write_all(&d.data) {
                        failure = Some(io_error(&e, "writing", &req.path));
                        file = None;
                    } else {
                        written += d.data.len() as u64;
                    }
                }
            }
            Some(request::Body::FileEnd(_)) => break,
            _ => {
                return conn.send_error(
                    ErrorKind::Protocol,
                    "unexpected frame during write_file: only FileChunk and FileEnd may follow WriteFile",
                )
            }
        }
    }
    if let (Some(f), None) = (file.as_ref(), failure.as_ref()) {
        // Explicit modes must win over the umask.
        if req.mode != 0 {
            if let Err(e) = f.set_permissions(fs::Permissions::from_mode(mode)) {
                failure = Some(io_error(&e, "setting the mode of", &req.path));
            }
        }
    }
    match failure {
        Some((k, m)) => conn.send_error(k, m),
        None => conn.send_body(response::Body::WriteDone(WriteDone { size: written })),
    }
}

pub fn read_file(conn: &mut Conn, path: &str) -> io::Result<()> {
    if !check_absolute(conn, path)? {
        return Ok(());
    }
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            let (k, m) = io_error(&e, "opening", path);
            return conn.send_error(k, m);
        }
    };
    let meta = match f.metadata() {
        Ok(m) => m,
        Err(e) => {
            let (k, m) = io_error(&e, "inspecting", path);
            return conn.send_error(k, m);
        }
    };
    if meta.is_dir() {
        return conn.send_error(ErrorKind::InvalidArgument, format!("is a directory: {path} (use list_dir)"));
    }
    let mut buf = vec![0u8; FILE_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let (k, m) = io_error(&e, "reading", path);
                return conn.send_error(k, m);
            }
        };
        conn.send_body(response::Body::FileChunk(Data { data: buf[..n].to_vec() }))?;
        total += n as u64;
    }
    conn.send_body(response::Body::FileEnd(FileEnd { size: total, mode: meta.mode() & 0o7777 }))
}

pub fn list_dir(conn: &mut Conn, path: &str) -> io::Result<()> {
    if !check_absolute(conn, path)? {
        return Ok(());
    }
    let rd = match fs::read_dir(path) {
        Ok(rd) => rd,
        Err(e) => {
            let (k, mut m) = io_error(&e, "listing", path);
            if e.raw_os_error() == Some(libc::ENOTDIR) {
                m = format!("not a directory: {path} (use read_file)");
            }
            return conn.send_error(k, m);
        }
    };
    let mut entries = Vec::new();
    for ent in rd {
        let ent = match ent {
            Ok(e) => e,
            Err(e) => {
                let (k, m) = io_error(&e, "listing", path);
                return conn.send_error(k, m);
            }
        };
        // Entries removed while we list are skipped.
        let Ok(meta) = ent.metadata() else { continue };
        let ft = meta.file_type();
        let file_type = if ft.is_file() {
            FileType::File
        } else if ft.is_dir() {
            FileType::Dir
        } else if ft.is_symlink() {
            FileType::Symlink
        } else {
            FileType::Other
        };
        entries.push(DirEntry {
            name: ent.file_name().to_string_lossy().into_owned(),
            file_type: file_type as i32,
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            mtime: meta.mtime(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut it = entries.into_iter().peekable();
    while it.peek().is_some() {
        let batch: Vec<DirEntry> = it.by_ref().take(DIR_BATCH).collect();
        conn.send_body(response::Body::DirEntries(DirEntries { entries: batch }))?;
    }
    conn.send_body(response::Body::DirEnd(Empty {}))
}
