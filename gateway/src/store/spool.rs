//! The spool: an append-only file of usage rows (JSON lines) that holds batches while
//! the store cannot take them. Each append is fsync'd, so a batch the spool accepted
//! survives a crash; a torn last line (a crash mid-append) is skipped on reading.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::UsageRow;

/// A spool file. Blocking I/O: call it from a blocking task.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
}

impl Spool {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends rows and syncs them to disk.
    pub fn append(&self, rows: &[UsageRow]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(rows.len() * 512);
        for r in rows {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&buf)?;
        f.sync_data()
    }

    /// Every complete row, oldest first.
    pub fn read(&self) -> io::Result<Vec<UsageRow>> {
        let f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut rows = Vec::new();
        for line in BufReader::new(f).lines() {
            let line = line?;
            match serde_json::from_str(&line) {
                Ok(r) => rows.push(r),
                // Only a crash mid-append leaves a broken line, and only as the last.
                Err(e) => tracing::warn!(error = %e, "skipping a torn spool line"),
            }
        }
        Ok(rows)
    }

    /// Bytes waiting.
    pub fn len(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Empties the spool once its rows are stored.
    pub fn clear(&self) -> io::Result<()> {
        match File::create(&self.path) {
            Ok(f) => f.sync_all(),
            Err(e) => Err(e),
        }
    }
}
