//! A libvirt connection that is closed when dropped.
//!
//! `virt::connect::Connect` (0.4) has no `Drop`: every `open` without a matching `close`
//! leaks a client connection to libvirtd. A long-running daemon that opens connections per
//! migration (to its own libvirtd and to the destination's) would pile them up until
//! libvirtd stops answering new clients, which the bench hit after some 20 migrations.

use std::ops::Deref;

use crate::error::DaemonError;
use virt::connect::Connect;

/// An open libvirt connection; closed on drop (after the domains looked up through it, which
/// are declared later and so dropped first).
pub struct Conn(Connect);

impl Conn {
    /// Opens `uri`.
    pub fn open(uri: &str) -> Result<Conn, virt::error::Error> {
        Connect::open(Some(uri)).map(Conn)
    }
}

impl Deref for Conn {
    type Target = Connect;

    fn deref(&self) -> &Connect {
        &self.0
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Nothing useful to do if closing fails: the daemon goes on either way.
        let _ = self.0.close();
    }
}

/// The libvirt host UUID `conn` reports (`<host><uuid>` of its capabilities), lowercase.
pub fn host_uuid(conn: &Connect) -> Result<String, DaemonError> {
    let caps = conn.get_capabilities().map_err(DaemonError::libvirt)?;
    vmbeam_core::host::host_uuid(&caps)
        .map_err(|e| DaemonError::Failed(format!("libvirt's host capabilities: {e}")))
}
