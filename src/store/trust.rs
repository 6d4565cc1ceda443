//! The trust boundaries of the state dir (SPEC 8.4): who may confirm, the
//! modes the state dir and `confirm/` are created with, and how a token file
//! and the lock file are opened.
//!
//! Invariant: a token file is read only through a descriptor opened without
//! following symlinks and without blocking, and everything decided about it
//! (type, owner, mode, mtime) comes from `fstat` of that descriptor, so the
//! file judged is the file read. Every refusal is a sentence naming why.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::StoreError;

/// Largest token file read; a token is a few lines.
pub const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// `confirmers` from tend.yaml, resolved to ids on this machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Confirmers {
    uids: BTreeSet<u32>,
    group: Option<Group>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Group {
    name: String,
    gid: u32,
    /// The group's supplementary members by name (members by primary group
    /// are found through the owner's passwd entry).
    members: BTreeSet<String>,
}

impl Confirmers {
    /// Resolve user names and `@group` names. At most one group: the state
    /// dir and `confirm/` can belong to one group only.
    pub fn resolve(names: &[String]) -> Result<Confirmers, StoreError> {
        let mut out = Confirmers::default();
        for name in names {
            if let Some(g) = name.strip_prefix('@') {
                let Some((gid, members)) = group_by_name(g) else {
                    return Err(StoreError::Confirmers(format!(
                        "no group `{g}` on this machine"
                    )));
                };
                if let Some(prev) = &out.group {
                    return Err(StoreError::Confirmers(format!(
                        "two groups (`@{}` and `@{g}`): the confirm directory can belong to one group only",
                        prev.name
                    )));
                }
                out.group = Some(Group {
                    name: g.to_string(),
                    gid,
                    members: members.into_iter().collect(),
                });
            } else {
                let Some((uid, _)) = user_by_name(name) else {
                    return Err(StoreError::Confirmers(format!(
                        "no user `{name}` on this machine"
                    )));
                };
                out.uids.insert(uid);
            }
        }
        Ok(out)
    }

    /// The confirmers group's id, if there is one.
    pub fn gid(&self) -> Option<u32> {
        self.group.as_ref().map(|g| g.gid)
    }

    pub fn root_mode(&self) -> u32 {
        if self.group.is_some() { 0o750 } else { 0o700 }
    }

    pub fn confirm_mode(&self) -> u32 {
        if self.group.is_some() { 0o1770 } else { 0o700 }
    }

    /// Mode of a token `tend confirm` writes.
    pub fn token_mode(&self) -> u32 {
        if self.group.is_some() { 0o640 } else { 0o600 }
    }

    /// Whether a file owned by `uid` may be a token: tend's own user, root,
    /// a listed user, or a member of the confirmers group.
    pub fn owner_allowed(&self, uid: u32) -> bool {
        if uid == 0 || uid == own_uid() || self.uids.contains(&uid) {
            return true;
        }
        let Some(g) = &self.group else { return false };
        user_by_uid(uid).is_some_and(|(name, gid)| gid == g.gid || g.members.contains(&name))
    }
}

/// The effective user id tend runs as.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Create `dir` if missing and give it `mode` (and `gid`) whatever the
/// umask. The state dir itself may be a symlink an administrator chose (to
/// /var/lib, say: `may_be_symlink`); `confirm/` and `confirm/used/` may not,
/// since one pointing elsewhere lets whoever owns the target place tokens.
pub fn ensure_private_dir(
    dir: &Path,
    mode: u32,
    gid: Option<u32>,
    may_be_symlink: bool,
) -> Result<(), StoreError> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() && !may_be_symlink => {
            return Err(StoreError::Untrusted {
                path: dir.to_owned(),
                why: "it is a symlink; remove it and let tend create the directory".into(),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent)
                    .map_err(|e| StoreError::io("create directory", parent, e))?;
            }
            match DirBuilder::new().mode(mode & 0o777).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::io("create directory", dir, e)),
            }
        }
        Err(e) => return Err(StoreError::io("inspect", dir, e)),
    }
    let meta = fs::metadata(dir).map_err(|e| StoreError::io("inspect", dir, e))?;
    if let Some(gid) = gid
        && meta.gid() != gid
    {
        std::os::unix::fs::chown(dir, None, Some(gid))
            .map_err(|e| StoreError::io("give the confirmers group", dir, e))?;
    }
    // Set after chown: chown clears the set-gid and sticky bits on some
    // systems, and the umask never applies to chmod.
    if meta.mode() & 0o7777 != mode || gid.is_some_and(|g| meta.gid() != g) {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .map_err(|e| StoreError::io("set the mode of", dir, e))?;
    }
    Ok(())
}

/// Open (creating 0600) the lock file without following a symlink and
/// without blocking on a FIFO; anything but a regular file is refused.
pub fn open_lock(path: &Path) -> Result<File, StoreError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => StoreError::Untrusted {
                path: path.to_owned(),
                why: "the lock file is a symlink; remove it (tend never follows one here)".into(),
            },
            _ => StoreError::io("open the lock file", path, e),
        })?;
    let meta = f
        .metadata()
        .map_err(|e| StoreError::io("inspect", path, e))?;
    if !meta.file_type().is_file() {
        return Err(StoreError::Untrusted {
            path: path.to_owned(),
            why: format!("the lock file is {}, not a regular file", kind_of(&meta)),
        });
    }
    Ok(f)
}

/// Why `confirm/` itself cannot be trusted, or `None` when it can: it must
/// be a real directory owned by tend's user or root, not world-writable,
/// and group-writable only by the confirmers group. Judged from `fstat` of
/// the directory opened without following a symlink.
pub fn confirm_dir_refusal(dir: &Path, confirmers: &Confirmers) -> Option<String> {
    let meta = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(dir)
        .and_then(|f| f.metadata())
    {
        Ok(m) => m,
        // With O_DIRECTORY, Linux reports a symlink as ENOTDIR, not ELOOP.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            let link = fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
            return Some(if link {
                "confirm/ is a symlink".into()
            } else {
                "confirm/ is not a directory".into()
            });
        }
        Err(e) => return Some(format!("confirm/ cannot be opened: {e}")),
    };
    let mode = meta.mode() & 0o7777;
    if meta.uid() != own_uid() && meta.uid() != 0 {
        return Some(format!(
            "confirm/ is owned by uid {}, not by tend's user or root",
            meta.uid()
        ));
    }
    if mode & 0o002 != 0 {
        return Some(format!(
            "confirm/ is world-writable (mode {mode:04o}); chmod o-w it"
        ));
    }
    if mode & 0o020 != 0 && confirmers.gid() != Some(meta.gid()) {
        return Some(format!(
            "confirm/ is writable by group {} (mode {mode:04o}), which is not a confirmers group; chmod g-w it",
            meta.gid()
        ));
    }
    None
}

/// A token file as read: bytes, permission bits and mtime from the open
/// descriptor.
#[derive(Debug)]
pub struct TokenRead {
    pub bytes: Vec<u8>,
    pub mode: u32,
    pub mtime: i64,
}

/// Open and read one token file, or say why it is refused: a symlink, a
/// FIFO, a directory or anything but a regular file; an owner outside
/// `confirmers`; more than [`MAX_TOKEN_BYTES`]. Opening never blocks, so a
/// FIFO dropped into `confirm/` cannot hang a pass.
pub fn read_token(path: &Path, confirmers: &Confirmers) -> Result<TokenRead, String> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => "a symlink; token files are never followed".to_string(),
            _ => format!("cannot be opened: {e}"),
        })?;
    let meta = f
        .metadata()
        .map_err(|e| format!("cannot be inspected: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("{}, not a regular file", kind_of(&meta)));
    }
    if !confirmers.owner_allowed(meta.uid()) {
        return Err(format!(
            "owned by uid {}, which is neither tend's user, root nor one of `confirmers`",
            meta.uid()
        ));
    }
    if meta.len() > MAX_TOKEN_BYTES {
        return Err(format!(
            "{} bytes, more than a token's limit of {MAX_TOKEN_BYTES}",
            meta.len()
        ));
    }
    let mut bytes = Vec::new();
    (&mut f)
        .take(MAX_TOKEN_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if bytes.len() as u64 > MAX_TOKEN_BYTES {
        return Err(format!(
            "more than a token's limit of {MAX_TOKEN_BYTES} bytes"
        ));
    }
    Ok(TokenRead {
        bytes,
        mode: meta.mode(),
        mtime: meta.mtime(),
    })
}

fn kind_of(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symlink"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Calls a `get*_r` function with a growing buffer until it fits.
fn with_buffer<T>(
    mut call: impl FnMut(&mut [libc::c_char]) -> Result<Option<T>, i32>,
) -> Option<T> {
    let mut len = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; len];
        match call(&mut buf) {
            Ok(v) => return v,
            Err(libc::ERANGE) if len < 1 << 20 => len *= 4,
            Err(_) => return None,
        }
    }
}

/// `(uid, primary gid)` of a user name.
fn user_by_name(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    with_buffer(|buf| {
        // SAFETY: all pointers are valid for the call; the result points
        // into `pw` and `buf`, both alive while it is read.
        unsafe {
            let mut pw: libc::passwd = std::mem::zeroed();
            let mut res = std::ptr::null_mut();
            let rc = libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut res);
            if rc != 0 {
                return Err(rc);
            }
            Ok((!res.is_null()).then_some((pw.pw_uid, pw.pw_gid)))
        }
    })
}

/// `(name, primary gid)` of a uid.
fn user_by_uid(uid: u32) -> Option<(String, u32)> {
    with_buffer(|buf| {
        // SAFETY: as in `user_by_name`.
        unsafe {
            let mut pw: libc::passwd = std::mem::zeroed();
            let mut res = std::ptr::null_mut();
            let rc = libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut res);
            if rc != 0 {
                return Err(rc);
            }
            Ok((!res.is_null()).then(|| {
                (
                    CStr::from_ptr(pw.pw_name).to_string_lossy().into_owned(),
                    pw.pw_gid,
                )
            }))
        }
    })
}

/// `(gid, supplementary member names)` of a group name.
fn group_by_name(name: &str) -> Option<(u32, Vec<String>)> {
    let c = CString::new(name).ok()?;
    with_buffer(|buf| {
        // SAFETY: as in `user_by_name`; `gr_mem` is a NULL-terminated array
        // of C strings inside `buf`.
        unsafe {
            let mut gr: libc::group = std::mem::zeroed();
            let mut res = std::ptr::null_mut();
            let rc = libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut res);
            if rc != 0 {
                return Err(rc);
            }
            if res.is_null() {
                return Ok(None);
            }
            let mut members = Vec::new();
            let mut p = gr.gr_mem;
            while !p.is_null() && !(*p).is_null() {
                members.push(CStr::from_ptr(*p).to_string_lossy().into_owned());
                p = p.add(1);
            }
            Ok(Some((gr.gr_gid, members)))
        }
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// Runs `f` with the process umask set to `mask`. The umask is per
    /// process, so tests that depend on it take this lock.
    pub(crate) fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: umask has no preconditions.
        let old = unsafe { libc::umask(mask as libc::mode_t) };
        let out = f();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        out
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn state_dir_is_private_under_umask_000() {
        let d = tempfile::tempdir().unwrap();
        let sd = super::super::StateDir::new(d.path().join("st"));
        with_umask(0o000, || sd.ensure().unwrap());
        assert_eq!(mode(sd.root()), 0o700);
        assert_eq!(mode(&sd.confirm_dir()), 0o700);
        assert_eq!(mode(&sd.confirm_used_dir()), 0o700);
        assert_eq!(
            confirm_dir_refusal(&sd.confirm_dir(), &Confirmers::default()),
            None
        );
    }

    #[test]
    fn an_existing_world_writable_confirm_dir_is_tightened() {
        let d = tempfile::tempdir().unwrap();
        let sd = super::super::StateDir::new(d.path().join("st"));
        fs::create_dir_all(sd.confirm_dir()).unwrap();
        fs::set_permissions(sd.confirm_dir(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            confirm_dir_refusal(&sd.confirm_dir(), &Confirmers::default())
                .is_some_and(|r| r.contains("world-writable"))
        );
        sd.ensure().unwrap();
        assert_eq!(mode(&sd.confirm_dir()), 0o700);
    }

    #[test]
    fn a_symlinked_confirm_dir_is_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("elsewhere")).unwrap();
        fs::create_dir(d.path().join("st")).unwrap();
        symlink(d.path().join("elsewhere"), d.path().join("st/confirm")).unwrap();
        let sd = super::super::StateDir::new(d.path().join("st"));
        assert!(sd.ensure().unwrap_err().to_string().contains("symlink"));
        assert!(
            confirm_dir_refusal(&sd.confirm_dir(), &Confirmers::default())
                .is_some_and(|r| r.contains("symlink"))
        );
    }

    #[test]
    fn the_lock_never_follows_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let sd = super::super::StateDir::new(d.path().join("st"));
        sd.ensure().unwrap();
        symlink(&victim, sd.lock_path()).unwrap();
        let err = sd.open_lock().unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn token_files_that_are_not_regular_files_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let c = Confirmers::default();
        let fifo = d.path().join("f.yaml");
        let cpath = CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string path.
        assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
        assert_eq!(
            read_token(&fifo, &c).unwrap_err(),
            "a FIFO, not a regular file"
        );
        fs::create_dir(d.path().join("d.yaml")).unwrap();
        assert_eq!(
            read_token(&d.path().join("d.yaml"), &c).unwrap_err(),
            "a directory, not a regular file"
        );
        fs::write(d.path().join("real"), b"x").unwrap();
        symlink(d.path().join("real"), d.path().join("l.yaml")).unwrap();
        assert!(
            read_token(&d.path().join("l.yaml"), &c)
                .unwrap_err()
                .contains("symlink")
        );
        fs::write(d.path().join("ok.yaml"), b"operation: x\n").unwrap();
        assert_eq!(
            read_token(&d.path().join("ok.yaml"), &c).unwrap().bytes,
            b"operation: x\n"
        );
    }

    #[test]
    fn owners_outside_confirmers_are_refused() {
        let c = Confirmers::default();
        assert!(c.owner_allowed(own_uid()));
        assert!(c.owner_allowed(0));
        // uid 65534 is `nobody` on Debian; never tend's user in tests.
        if own_uid() != 65534 {
            assert!(!c.owner_allowed(65534));
            let with = Confirmers::resolve(&["nobody".into()]).unwrap();
            assert!(with.owner_allowed(65534));
        }
        assert!(Confirmers::resolve(&["no-such-user-here".into()]).is_err());
        assert!(Confirmers::resolve(&["@no-such-group-here".into()]).is_err());
        let c = Confirmers::resolve(&["@root".into()]).unwrap();
        assert_eq!(c.gid(), Some(0));
        assert_eq!(
            (c.root_mode(), c.confirm_mode(), c.token_mode()),
            (0o750, 0o1770, 0o640)
        );
        assert!(Confirmers::resolve(&["@root".into(), "@nogroup".into()]).is_err());
    }

    #[test]
    fn a_confirmers_group_gets_a_sticky_group_writable_confirm_dir() {
        let d = tempfile::tempdir().unwrap();
        // Root's group: a group this process can give its directories
        // (tests run as root; any user may use a group it belongs to).
        let gid = unsafe { libc::getegid() };
        let name = {
            let g = unsafe { libc::getgrgid(gid) };
            unsafe { CStr::from_ptr((*g).gr_name) }
                .to_string_lossy()
                .into_owned()
        };
        let sd =
            super::super::StateDir::with_confirmers(d.path().join("st"), &[format!("@{name}")])
                .unwrap();
        with_umask(0o077, || sd.ensure().unwrap());
        assert_eq!(mode(sd.root()), 0o750);
        assert_eq!(mode(&sd.confirm_dir()), 0o1770);
        assert_eq!(fs::metadata(sd.confirm_dir()).unwrap().gid(), gid);
        assert_eq!(
            confirm_dir_refusal(&sd.confirm_dir(), sd.confirmers()),
            None
        );
        // The same directory without that group as confirmers is refused.
        assert!(
            confirm_dir_refusal(&sd.confirm_dir(), &Confirmers::default())
                .is_some_and(|r| r.contains("not a confirmers group"))
        );
    }
}
