//! The state directory (`/var/lib/vmbeam-host`): the ledger (`ledger.json`), reloaded at
//! start, and the status snapshot (`status.json`) that `vmbeam-host status` prints. Both
//! are private (0600, in a 0700 directory) and replaced atomically (written aside and
//! renamed; the ledger also synced, with its directory).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ledger::{Ledger, SavedError, SavedLedger};
use crate::status::StatusSnapshot;

/// The ledger's file.
pub const LEDGER_FILE: &str = "ledger.json";
/// The status snapshot's file.
pub const STATUS_FILE: &str = "status.json";

/// A state file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file-system call failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// A file that is not what VMBeam wrote.
    #[error(
        "{path} is corrupt (fix or remove it: the ledger is rebuilt from the cloud VMs' live XML)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A ledger that breaks its invariants.
    #[error("{path} is not a consistent ledger (fix or remove it: the ledger is rebuilt from the cloud VMs' live XML)")]
    Ledger {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: SavedError,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens `dir`, creating it (0700) if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create", &dir))?;
        Ok(Self { dir })
    }

    /// The directory as it is, for reading (`vmbeam-host status` creates nothing).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved ledger; an empty one when there is none yet.
    pub fn load_ledger(&self) -> Result<Ledger, StateError> {
        let path = self.dir.join(LEDGER_FILE);
        let Some(saved) = self.read::<SavedLedger>(&path)? else {
            return Ok(Ledger::default());
        };
        Ledger::from_saved(saved).map_err(|source| StateError::Ledger { path, source })
    }

    /// Saves the ledger's committed state (synced to disk).
    pub fn save_ledger(&self, ledger: &Ledger) -> Result<(), StateError> {
        self.write(LEDGER_FILE, &ledger.to_saved(), true)
    }

    /// The last status snapshot, if the daemon ever wrote one.
    pub fn load_status(&self) -> Result<Option<StatusSnapshot>, StateError> {
        self.read(&self.dir.join(STATUS_FILE))
    }

    /// Replaces the status snapshot (not synced: it is rewritten every rescan, and only
    /// informs).
    pub fn save_status(&self, status: &StatusSnapshot) -> Result<(), StateError> {
        self.write(STATUS_FILE, status, false)
    }

    fn read<T: DeserializeOwned>(&self, path: &Path) -> Result<Option<T>, StateError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Corrupt {
                path: path.to_path_buf(),
                source,
            })
    }

    fn write<T: Serialize>(&self, name: &str, value: &T, durable: bool) -> Result<(), StateError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut json = serde_json::to_vec_pretty(value).expect("plain data serializes");
        json.push(b'\n');
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            if durable {
                f.sync_all()?;
            }
            fs::rename(&tmp, &path)?;
            if durable {
                fs::File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        })();
        written.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err("write", &path)(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn files_are_private_and_missing_ones_are_empty() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::open(root.path().join("a/b")).unwrap();
        assert_eq!(
            fs::metadata(state.dir()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(state.load_ledger().unwrap(), Ledger::default());
        assert!(state.load_status().unwrap().is_none());
        state.save_ledger(&Ledger::default()).unwrap();
        let meta = fs::metadata(state.dir().join(LEDGER_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(state.load_ledger().unwrap(), Ledger::default());
        // Nothing left aside.
        let names: Vec<_> = fs::read_dir(state.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(LEDGER_FILE)]);
    }

    #[test]
    fn corrupt_and_inconsistent_ledgers_are_refused_with_the_way_out() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::open(root.path()).unwrap();
        fs::write(root.path().join(LEDGER_FILE), "{not json").unwrap();
        let e = state.load_ledger().unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }));
        assert!(e
            .to_string()
            .contains("rebuilt from the cloud VMs' live XML"));
        fs::write(
            root.path().join(LEDGER_FILE),
            r#"{"version":2,"guests":[]}"#,
        )
        .unwrap();
        assert!(matches!(
            state.load_ledger(),
            Err(StateError::Ledger { .. })
        ));
        fs::write(
            root.path().join(LEDGER_FILE),
            r#"{"version":1,"guests":[{"guest":{"cloud":"acme","uuid":"6e3b1e9a-1b2c-4d5e-8f90-0123456789ab"},"bar_size":3,"ram_bytes":null,"holders":[]}]}"#,
        )
        .unwrap();
        assert!(matches!(
            state.load_ledger(),
            Err(StateError::Ledger { .. })
        ));
    }
}
