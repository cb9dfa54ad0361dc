//! The data directory's format version: a `FORMAT` file beside the database.
//!
//! A replica reads it before it touches anything else in the directory (before the pid lock
//! and before sled opens the database, both of which write), so a directory written by a newer
//! fleet is refused with a clear message and left byte for byte as it was. A directory without
//! the file was written by a fleet from before it existed (format 0: the same layout as
//! format 1) and is stamped on start. The file is written atomically: temporary file, fsync,
//! rename, fsync of the directory.
//!
//! Bump [`DATA_FORMAT`] when a fleet writes something into the directory that an older fleet
//! would misread: a new file layout, a new database, a log entry or state encoding the
//! previous release cannot decode even with the cluster version gate (see docs/operations.md,
//! "Versions and upgrades").

use std::io::Write as _;
use std::path::Path;

/// The data directory format this build writes and the newest it reads.
pub const DATA_FORMAT: u32 = 1;
/// The file that holds it.
pub const FORMAT_FILE: &str = "FORMAT";

/// What a data directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Nothing yet (absent or empty): a new node.
    Empty,
    /// A database without a `FORMAT` file: written before the file existed (format 0).
    Unversioned,
    /// A `FORMAT` file of this version.
    Format(u32),
}

/// Reads the directory's format, changing nothing.
pub fn inspect(dir: &Path) -> anyhow::Result<Found> {
    let path = dir.join(FORMAT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text).map(Found::Format).ok_or_else(|| {
            anyhow::anyhow!(
                "{} is not understood ({:?}); expected a line `format N`",
                path.display(),
                text.chars().take(80).collect::<String>()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let empty = match std::fs::read_dir(dir) {
                Ok(mut entries) => entries.next().is_none(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => anyhow::bail!("cannot read data directory {}: {e}", dir.display()),
            };
            Ok(if empty {
                Found::Empty
            } else {
                Found::Unversioned
            })
        }
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    }
}

/// Refuses a directory of a format newer than this build reads; changes nothing.
pub fn check(dir: &Path) -> anyhow::Result<Found> {
    let found = inspect(dir)?;
    if let Found::Format(v) = found {
        if v > DATA_FORMAT {
            anyhow::bail!(
                "data directory {} is format {v}, written by a newer fleet; this fleet ({}) \
                 reads data directory formats up to {DATA_FORMAT}. Nothing in the directory was \
                 changed: run the newer fleet on it, or restore a backup taken for this version \
                 (docs/operations.md, \"Versions and upgrades\")",
                dir.display(),
                env!("CARGO_PKG_VERSION")
            );
        }
    }
    Ok(found)
}

/// Records this build's format in the directory if it holds an older one or none (fsynced).
pub fn stamp(dir: &Path, found: Found) -> std::io::Result<()> {
    if found == Found::Format(DATA_FORMAT) {
        return Ok(());
    }
    let tmp = dir.join(format!("{FORMAT_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        write!(
            f,
            "fleet data directory\nformat {DATA_FORMAT}\nwritten by fleet {}\n",
            env!("CARGO_PKG_VERSION")
        )?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(FORMAT_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Gives everything in `dir` to `dir`'s owner. For the commands an operator runs as root on
/// a replica's data directory while the replica itself runs as another user (`fleet recover`
/// on a packaged replica, which runs as `fleet`): files they create would otherwise be root's,
/// and the replica could not open them. Returns how many entries changed owner.
pub fn give_to_owner(dir: &Path) -> std::io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(dir)?;
    let (uid, gid) = (owner.uid(), owner.gid());
    let mut changed = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            let m = std::fs::symlink_metadata(&path)?;
            if m.uid() != uid || m.gid() != gid {
                std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
                changed += 1;
            }
            if m.is_dir() {
                todo.push(path);
            }
        }
    }
    Ok(changed)
}

fn parse(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("format "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_is_stamped_and_an_old_one_too() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(inspect(dir.path()).unwrap(), Found::Empty);
        std::fs::create_dir(dir.path().join("db")).unwrap();
        let found = check(dir.path()).unwrap();
        assert_eq!(found, Found::Unversioned);
        stamp(dir.path(), found).unwrap();
        assert_eq!(check(dir.path()).unwrap(), Found::Format(DATA_FORMAT));
        let missing = dir.path().join("nothing-here");
        assert_eq!(inspect(&missing).unwrap(), Found::Empty);
    }

    #[test]
    fn a_newer_or_garbled_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(FORMAT_FILE);
        std::fs::write(
            &file,
            format!("fleet data directory\nformat {}\n", DATA_FORMAT + 1),
        )
        .unwrap();
        let e = check(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("is format {}", DATA_FORMAT + 1)), "{e}");
        assert!(e.contains("Nothing in the directory was changed"), "{e}");
        std::fs::write(&file, "garbage").unwrap();
        let e = check(dir.path()).unwrap_err().to_string();
        assert!(e.contains("expected a line `format N`"), "{e}");
    }
}
