//! vmbeamd: VMBeam's daemon. It owns the state of beam-enabled domains, answers the libvirt
//! hook, and drives every migration as libvirt's own job (P2P `migrateToURI3`), so
//! `virsh domjobinfo`/`domjobabort` and libvirt's events behave as users know.

pub mod cli;
pub mod config;
pub mod devpool;
pub mod engine;
pub mod error;
pub mod fault;
pub mod guest_pool;
pub mod hooks;
pub mod hostlink;
pub mod libvirt_conn;
pub mod libvirt_job;
pub mod ops;
pub mod recover;
pub mod rendezvous;
pub mod service;
pub mod state;

#[cfg(test)]
mod host_fixture;
#[cfg(test)]
mod hostile_support;
#[cfg(test)]
mod testing;
