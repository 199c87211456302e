//! Crash recovery: what a vmbeamd that (re)starts does with the hand-overs a dead daemon left
//! half done.
//!
//! A zero-copy migration's owner record goes `active` → `handing-over` → `active` (with the
//! destination as owner, or the source again). The job that moves it lives in the source's
//! vmbeamd; libvirt's own job lives in libvirtd. If vmbeamd dies in between (killed, a
//! package upgrade restarting it at the wrong moment), libvirt's job still ends, but nothing
//! records how: the record stays `handing-over` and every later migration of the guest is
//! refused. The same holds on the destination: its watcher, which leaves the `.ran` marker
//! once the guest runs there, dies with its daemon.
//!
//! The decisions here are pure: they take what this host's libvirt says of the domain
//! ([`Local`]) and whether the destination left its marker, and say what to do
//! ([`SourceAction`], [`DestinationAction`]). The source only ever acts on what it observes:
//! the destination ran the guest (its marker) or the guest runs here with no job in flight.
//! Anything else is held, with what the operator can do, until one of those is observed.

use std::fmt;

/// What this host's libvirt says of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Local {
    /// Unknown to libvirt, or defined but shut off.
    Absent,
    /// Active and running, no job.
    Running,
    /// Active and paused, no job.
    Paused,
    /// A libvirt job (a migration) is in flight.
    Migrating,
}

impl fmt::Display for Local {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Absent => "not running here",
            Self::Running => "running here",
            Self::Paused => "paused here",
            Self::Migrating => "in a libvirt job here",
        })
    }
}

/// Why a half-done hand-over is held rather than settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Doubt {
    /// The guest is paused here after the migration, and the destination has not said it
    /// ran the guest.
    PausedHere,
    /// The guest is not here, and the destination has not said it ran the guest.
    Nowhere,
}

impl Doubt {
    /// What the operator is told (`vmbeam status` shows it next to the pool file).
    pub fn advice(&self, dest: &str) -> String {
        match self {
            Self::PausedHere => format!(
                "in doubt: the guest is paused here after an interrupted migration and {dest} has \
                 not reported running it. If it runs on {dest}, {dest}'s vmbeamd reports that and \
                 this host destroys its paused copy and hands the file over; if it does not run \
                 on {dest}, resume it here (virsh resume) and this host takes the file back"
            ),
            Self::Nowhere => format!(
                "in doubt: the guest is not running here and {dest} has not reported running it \
                 (its vmbeamd may be down, or the guest's QEMU died). The memory file is kept; \
                 once {dest}'s vmbeamd reports the guest running, the hand-over completes. If \
                 the guest runs nowhere, start it again (it boots on a fresh memory file) and \
                 delete this file and its .owner record from the pool by hand"
            ),
        }
    }
}

/// What the source (the record's owner, `handing-over`) does with an interrupted hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceAction {
    /// libvirt's job is still in flight: look again later.
    Wait,
    /// The guest runs on the destination and not here: record the hand-over.
    Complete,
    /// The destination ran the guest, yet libvirt keeps a copy here: destroy it (two CPUs
    /// must never write one memory), then record the hand-over.
    FenceThenComplete,
    /// The guest runs here and never ran on the destination: make the hypervisor send
    /// shared RAM again and take the file back.
    TakeBack,
    /// Not enough is observed to act safely.
    Hold(Doubt),
}

/// The source's decision, from what its libvirt says and whether the destination's marker
/// (`<file>.ran`) is there.
pub fn source_action(local: Local, destination_ran: bool) -> SourceAction {
    match (local, destination_ran) {
        (Local::Migrating, _) => SourceAction::Wait,
        (Local::Absent, true) => SourceAction::Complete,
        (Local::Running | Local::Paused, true) => SourceAction::FenceThenComplete,
        (Local::Running, false) => SourceAction::TakeBack,
        (Local::Paused, false) => SourceAction::Hold(Doubt::PausedHere),
        (Local::Absent, false) => SourceAction::Hold(Doubt::Nowhere),
    }
}

/// What the destination (the record's recipient) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestinationAction {
    /// Nothing (yet): the guest does not run here.
    Nothing,
    /// The guest runs here: leave the marker (if missing) and make the hypervisor send
    /// shared RAM again in a later migration (the watcher that would have done both died).
    MarkRan,
}

/// The destination's decision, from what its libvirt says.
pub fn destination_action(local: Local) -> DestinationAction {
    match local {
        Local::Running => DestinationAction::MarkRan,
        Local::Absent | Local::Paused | Local::Migrating => DestinationAction::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Local; 4] = [
        Local::Absent,
        Local::Running,
        Local::Paused,
        Local::Migrating,
    ];

    #[test]
    fn the_source_never_resumes_or_keeps_a_guest_the_destination_ran() {
        for local in ALL {
            let a = source_action(local, true);
            assert!(
                matches!(
                    a,
                    SourceAction::Wait | SourceAction::Complete | SourceAction::FenceThenComplete
                ),
                "{local:?}: {a:?}"
            );
            if matches!(local, Local::Running | Local::Paused) {
                assert_eq!(a, SourceAction::FenceThenComplete, "{local:?}");
            }
        }
    }

    #[test]
    fn the_source_takes_the_file_back_only_while_the_guest_runs_here_unmarked() {
        for local in ALL {
            for ran in [false, true] {
                let a = source_action(local, ran);
                assert_eq!(
                    a == SourceAction::TakeBack,
                    local == Local::Running && !ran,
                    "{local:?} ran={ran}: {a:?}"
                );
            }
        }
    }

    #[test]
    fn nothing_is_settled_while_libvirt_still_runs_the_job() {
        assert_eq!(source_action(Local::Migrating, false), SourceAction::Wait);
        assert_eq!(source_action(Local::Migrating, true), SourceAction::Wait);
        assert_eq!(
            destination_action(Local::Migrating),
            DestinationAction::Nothing
        );
    }

    #[test]
    fn what_cannot_be_observed_is_held_with_advice_naming_the_destination() {
        assert_eq!(
            source_action(Local::Absent, false),
            SourceAction::Hold(Doubt::Nowhere)
        );
        assert_eq!(
            source_action(Local::Paused, false),
            SourceAction::Hold(Doubt::PausedHere)
        );
        for d in [Doubt::Nowhere, Doubt::PausedHere] {
            let text = d.advice("cvm2");
            assert!(text.starts_with("in doubt: "), "{text}");
            assert!(text.contains("cvm2"), "{text}");
        }
        assert!(Doubt::PausedHere.advice("cvm2").contains("virsh resume"));
    }

    #[test]
    fn the_destination_marks_only_a_guest_that_runs_there() {
        for local in ALL {
            assert_eq!(
                destination_action(local) == DestinationAction::MarkRan,
                local == Local::Running,
                "{local:?}"
            );
        }
    }
}
