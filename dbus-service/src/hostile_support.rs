//! Helpers for the hostile-input tests: the pool is shared with other cloud VMs, which may
//! leave anything at the names VMBeam uses. No libvirt, no QEMU.

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A file outside the pool, which nothing done in the pool may change.
pub struct Outside {
    pub dir: tempfile::TempDir,
    pub file: PathBuf,
    pub content: Vec<u8>,
}

impl Outside {
    pub fn new(content: &[u8]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sentinel");
        fs::write(&file, content).expect("sentinel");
        Outside {
            dir,
            file,
            content: content.to_vec(),
        }
    }

    /// Still there, a regular file with the same content, and nothing new beside it.
    #[track_caller]
    pub fn assert_untouched(&self) {
        let meta = fs::symlink_metadata(&self.file).expect("the file outside the pool is gone");
        assert!(meta.is_file(), "the file outside the pool was replaced");
        assert_eq!(
            String::from_utf8_lossy(&fs::read(&self.file).expect("read")),
            String::from_utf8_lossy(&self.content),
            "the file outside the pool was written"
        );
        assert_eq!(
            names(self.dir.path()),
            ["sentinel"],
            "a file appeared outside the pool"
        );
    }
}

/// The names in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    v.sort();
    v
}

/// A regular file, mode 0600.
#[track_caller]
pub fn assert_private_file(path: &Path) {
    let meta = fs::symlink_metadata(path).expect("stat");
    assert!(meta.is_file(), "{} is not a regular file", path.display());
    assert_eq!(meta.mode() & 0o777, 0o600, "{}", path.display());
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(st.success(), "mkfifo {}", path.display());
}

/// Sets the modification time of `path` itself (not of what a symlink points at, and
/// without opening a FIFO) two hours back.
pub fn age(path: &Path) {
    let st = std::process::Command::new("touch")
        .args(["-h", "-m", "-d", "2 hours ago"])
        .arg(path)
        .status()
        .expect("touch");
    assert!(st.success(), "touch {}", path.display());
}

/// Runs `f` on a thread of its own and fails the test if it has not returned within 10 s
/// (an open blocked on a FIFO never returns).
#[track_caller]
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}: still blocked after 10 s"))
}
