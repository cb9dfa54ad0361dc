//! A lock file that names its holder: `flock(2)` on a file holding the holder's pid.
//!
//! A replica takes one on its data directory and `fleet up` one on its data root, so a second
//! process on the same data says at once who holds it ("in use by pid 1234") instead of failing
//! later with a storage error. The kernel releases the lock when the holder exits, however it
//! exits (even `kill -9`), so a stale file never blocks anyone: the lock, not the file's
//! existence, is what counts.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

/// A held lock; released when dropped or when the process exits.
#[derive(Debug)]
pub struct PidLock {
    _file: File,
    pub path: PathBuf,
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds it.
    #[error("in use by pid {pid} (lock file {path})")]
    Held { pid: String, path: PathBuf },
    #[error("cannot open the lock file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl PidLock {
    /// Takes the lock at `path` without waiting and writes this process's pid into it.
    pub fn acquire(path: &Path) -> Result<PidLock, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(LockError::Held {
                    pid: holder(&mut file),
                    path: path.to_path_buf(),
                });
            }
            return Err(io(err));
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(PidLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// The pid of the live process holding the lock at `path`, if one does.
    pub fn holder(path: &Path) -> Option<u32> {
        match PidLock::acquire(path) {
            Err(LockError::Held { pid, .. }) => pid.parse().ok(),
            _ => None,
        }
    }
}

fn holder(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.read_to_string(&mut s);
    match s.trim() {
        "" => "unknown".into(),
        pid => pid.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_released_one_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pid");
        let first = PidLock::acquire(&path).unwrap();
        // flock locks belong to the open file description: a second open in this process
        // conflicts exactly as another process would.
        match PidLock::acquire(&path) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("{other:?}"),
        }
        assert_eq!(PidLock::holder(&path), Some(std::process::id()));
        drop(first);
        assert_eq!(PidLock::holder(&path), None);
        PidLock::acquire(&path).unwrap();
    }
}
