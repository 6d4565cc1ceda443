//! Atomic file replacement: readers of status files and artifacts see the old
//! document or the new one, never a torn write, even across a crash.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::StoreError;

/// Makes temp names unique within this process; the pid in the name makes
/// them unique between processes.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replace `path` with `bytes` atomically: write a temp file in the same
/// directory (so the rename cannot cross file systems), fsync it, rename it
/// over `path`, then fsync the directory so the rename itself survives a
/// crash. Creates missing parent directories. On failure the old file is
/// left as it was and the temp file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// [`write_atomic`] without the directory fsync: the caller syncs the
/// directory once after many files ([`sync_dir`]). The file itself is
/// still fsynced before the rename, so it is never seen torn or empty.
pub fn write_atomic_deferred(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomic_inner(path, |f| f.write_all(bytes), false)
}

/// fsync the directory `dir`, making the renames into it durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("sync directory", dir, e))
}

/// [`write_atomic`] of `value` as pretty JSON with a trailing newline.
/// The value is encoded before anything touches the disk, so an encoding
/// failure leaves the old file as it was.
pub fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), StoreError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Encode {
        path: path.to_owned(),
        source,
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// The directory `path` lives in; `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), StoreError> {
    write_atomic_inner(path, fill, true)
}

fn write_atomic_inner(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
    sync_parent: bool,
) -> Result<(), StoreError> {
    let Some(name) = path.file_name() else {
        return Err(StoreError::io(
            "write",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
        ));
    };
    let dir = parent_dir(path);
    fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, e))?;

    let (tmp, file) = create_temp(dir, name)?;
    if let Err(e) = fill_and_rename(file, fill, &tmp, path) {
        // Best effort: the error that matters is the one being returned.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if sync_parent {
        sync_dir(dir)?;
    }
    Ok(())
}

fn fill_and_rename(
    mut file: File,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
    tmp: &Path,
    path: &Path,
) -> Result<(), StoreError> {
    // Errors name the target, the file the operator knows; the temp file is
    // removed by the caller.
    fill(&mut file).map_err(|e| StoreError::io("write", path, e))?;
    // The data must be on disk before the rename makes it visible, or a crash
    // could leave a renamed but empty file.
    file.sync_all()
        .map_err(|e| StoreError::io("sync", path, e))?;
    drop(file);
    fs::rename(tmp, path).map_err(|e| StoreError::io("rename a temp file over", path, e))
}

/// Create `.<name>.tmp-<pid>-<n>` in `dir` with `create_new`, so two writers
/// never share a temp file. A name can still be taken by a temp file that a
/// crashed process with a recycled pid left behind; then the next number is
/// tried.
fn create_temp(dir: &Path, name: &std::ffi::OsStr) -> Result<(PathBuf, File), StoreError> {
    const TRIES: usize = 64;
    let mut last = None;
    for _ in 0..TRIES {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some((tmp, e)),
            Err(e) => return Err(StoreError::io("create temp file", &tmp, e)),
        }
    }
    let (tmp, e) = last.expect("TRIES > 0");
    Err(StoreError::io("create temp file", &tmp, e))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_content_and_leaves_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("status.json");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(names(d.path()), ["status.json"]);
    }

    #[test]
    fn creates_missing_parent_directories() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("runs/r-1/hosts/web-1/0-x.log");
        write_atomic(&p, b"log").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"log");
    }

    #[test]
    fn a_failed_write_keeps_the_old_content_and_removes_the_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("status.json");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |f| {
            f.write_all(b"half of the n")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("failed to write {}", p.display()),
            "{err}"
        );
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(names(d.path()), ["status.json"]);
    }

    #[test]
    fn a_directory_in_the_way_is_an_error_naming_the_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("result.json");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("keep"), b"kept").unwrap();
        let err = write_atomic(&p, b"new").unwrap_err();
        assert!(err.to_string().contains(&*p.to_string_lossy()), "{err}");
        assert_eq!(fs::read(p.join("keep")).unwrap(), b"kept");
        assert_eq!(names(d.path()), ["result.json"]);
    }

    #[test]
    fn a_parent_that_cannot_be_created_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let blocker = d.path().join("runs");
        fs::write(&blocker, b"a file, not a directory").unwrap();
        let err = write_atomic(&blocker.join("r-1/result.json"), b"x").unwrap_err();
        assert!(
            err.to_string().contains("create directory") && err.to_string().contains("runs"),
            "{err}"
        );
        assert_eq!(fs::read(&blocker).unwrap(), b"a file, not a directory");
    }

    #[test]
    fn json_is_pretty_with_a_trailing_newline() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_json_atomic(&p, &serde_json::json!({"schema_version": 1})).unwrap();
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "{\n  \"schema_version\": 1\n}\n"
        );
    }

    #[test]
    fn a_value_that_cannot_be_encoded_keeps_the_old_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"old").unwrap();
        // JSON object keys must be strings; a tuple key cannot be encoded.
        let bad: BTreeMap<(u8, u8), u8> = BTreeMap::from([((1, 2), 3)]);
        let err = write_json_atomic(&p, &bad).unwrap_err();
        assert!(err.to_string().contains("a.json"), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(names(d.path()), ["a.json"]);
    }
}
