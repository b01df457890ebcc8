//! The one way drover replaces a file: [`write_atomic`].
//!
//! Invariants: readers see the old bytes or the new bytes, never a mix (temp file in the
//! same directory, fsync, rename, fsync of the directory); the temp file has an
//! unpredictable name and is created with `O_EXCL|O_NOFOLLOW`, so a symlink or file
//! planted in a directory that others can write (a conf.d shared with the internet-facing
//! nginx) is never followed or reused; the mode is set on the open file, before any byte
//! is written, and is the replaced file's mode, masked to `0775` (taken from the file
//! itself, never through a symlink; new files and symlinks: 0644), so no setuid bit or
//! world-writable mode planted in a shared directory is carried over; no temp file is left
//! behind on any path. A single file bind-mounted into a container cannot be replaced by
//! rename (EBUSY), nor can a file across mounts (EXDEV): then the content is rewritten in
//! place, which is not atomic but is the only write such a file allows.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(&self) -> &std::io::Error {
        match self {
            Error::Write { source, .. } => source,
        }
    }
}

/// Mode of a file drover creates.
const NEW_FILE_MODE: u32 = 0o644;
/// The bits of a replaced file's mode that are kept: no setuid, setgid, sticky or
/// world-write.
const KEPT_MODE: u32 = 0o775;

/// The content of `path`, which must not be a symlink (`O_NOFOLLOW`): what drover reads
/// back of its own files in a directory others may write to.
pub fn read_own(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

/// Replaces `path` with `content` atomically (see the module docs for the fallback).
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<(), Error> {
    write_with(path, content, None)
}

/// [`write_atomic`] for a private key: mode 0600 whatever the file had, from the first
/// byte (no window in which another reader could open it).
pub fn write_private(path: &Path, content: &[u8]) -> Result<(), Error> {
    write_with(path, content, Some(0o600))
}

fn write_with(path: &Path, content: &[u8], mode: Option<u32>) -> Result<(), Error> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    write_via(
        path,
        content,
        &format!(".{name}.drover-{}", random_suffix()),
        mode,
    )
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 12];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No entropy source: still unique per process and call; O_EXCL keeps it safe.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = (crate::clock::unix_nanos() % 1_000_000_000) as u32;
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        bytes[8..].copy_from_slice(&nanos.to_le_bytes());
    }
    hex::encode(bytes)
}

/// [`write_atomic`] with a given temp file name (tests plant things there).
fn write_via(
    path: &Path,
    content: &[u8],
    temp_name: &str,
    fixed_mode: Option<u32>,
) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(temp_name);
    // Keep the mode of the file we replace, so a reader with other rights keeps reading;
    // a symlink's target is not ours to look at.
    let mode = fixed_mode.unwrap_or_else(|| {
        std::fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.file_type().is_file())
            .map(|m| m.permissions().mode() & KEPT_MODE)
            .unwrap_or(NEW_FILE_MODE)
    });
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(err)?;
    let staged = (|| {
        // The create mode went through the umask; set exactly the mode wanted.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    drop(file);
    match staged {
        Ok(()) => {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EXDEV)) {
                write_in_place(path, content).map_err(err)
            } else {
                Err(err(e))
            }
        }
    }
}

fn write_in_place(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(content)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_file_is_0600_even_over_a_looser_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("privkey.pem");
        std::fs::write(&key, "old").expect("write");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private(&key, b"new").expect("write");
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_own(&key).expect("read"), b"new");
    }

    #[test]
    fn a_planted_symlink_is_neither_read_nor_followed_and_modes_are_masked() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("cluster-key");
        std::fs::write(&secret, "key").expect("write");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o4777)).expect("chmod");
        let out = dir.path().join("drover.conf");
        symlink(&secret, &out).expect("symlink");
        assert!(read_own(&out).is_err(), "read through a symlink");
        write_atomic(&out, b"conf").expect("write");
        let meta = std::fs::symlink_metadata(&out).expect("meta");
        assert!(meta.file_type().is_file(), "the symlink is replaced");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
        assert_eq!(
            std::fs::read(&secret).expect("read"),
            b"key",
            "target untouched"
        );
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o6777)).expect("chmod");
        write_atomic(&out, b"conf2").expect("write");
        let mode = std::fs::metadata(&out).expect("meta").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o775, "setuid, setgid and world-write dropped");
        assert_eq!(read_own(&out).expect("read"), b"conf2");
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("a.conf");
        write_atomic(&out, b"1").expect("write");
        write_atomic(&out, b"2").expect("write");
        assert_eq!(std::fs::read(&out).expect("read"), b"2");
        assert_eq!(names(dir.path()), vec!["a.conf"]);
    }

    #[test]
    fn a_symlink_planted_at_the_temp_path_is_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").expect("write");
        let out = dir.path().join("a.conf");
        std::fs::write(&out, b"old").expect("write");
        std::os::unix::fs::symlink(&victim, dir.path().join(".a.conf.tmp")).expect("symlink");
        let e = write_via(&out, b"new", ".a.conf.tmp", None).expect_err("refused");
        assert_eq!(e.io().kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&victim).expect("read"), b"untouched");
        assert_eq!(std::fs::read(&out).expect("read"), b"old");
    }

    #[test]
    fn temp_names_are_unpredictable() {
        assert_ne!(random_suffix(), random_suffix());
        assert_eq!(random_suffix().len(), 24);
    }

    #[test]
    fn the_mode_of_the_replaced_file_is_kept_and_new_files_get_0644() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("a.conf");
        write_atomic(&out, b"1").expect("write");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&out), 0o644);
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        write_atomic(&out, b"2").expect("write");
        assert_eq!(mode(&out), 0o600);
    }

    #[test]
    fn a_failed_rename_leaves_no_temp_file_and_says_which_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A directory in the way: rename of a file over it fails (EISDIR).
        let out = dir.path().join("taken");
        std::fs::create_dir(&out).expect("mkdir");
        std::fs::write(out.join("inner"), b"x").expect("write");
        let e = write_atomic(&out, b"new").expect_err("cannot replace a directory");
        assert!(e.to_string().contains("taken"), "{e}");
        assert_eq!(names(dir.path()), vec!["taken"]);
    }
}
