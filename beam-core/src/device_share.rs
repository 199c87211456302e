//! The host-device pool's part of a zero-copy ticket: where the destination cloud VM finds
//! the guest's shared device (the host's placement there) and the control-page proof's
//! token ([`crate::control_page`]), signed with the cloud's ticket key and bound to one
//! ticket by its nonce.
//!
//! It travels beside the ticket in the destination XML's `<metadata>`
//! ([`crate::carrier::insert_device_share`]), so the ticket's own format (and the directory
//! pool's tickets) stay as they are. The destination trusts it only after the ticket
//! verified and [`DeviceShare::check`] bound the two: same guest, same ticket nonce,
//! addressed to the cloud VM the host knows it as.
//!
//! Encoding (`vmbds1.` + base64url, like a ticket): a label, the guest, the destination
//! cloud VM, the ticket's nonce, the placement (address, BAR size, RAM and control page
//! offsets), the proof token (nonce, SHA-256), then HMAC-SHA256 over all of that.

use crate::b64;
use crate::control_page::ControlToken;
use crate::host_protocol::{CloudVmId, PciAddress, Placement, CONTROL_PAGE};
use crate::ids::{DomainUuid, Nonce};
use crate::ticket::{Ticket, TicketKey};

/// Prefix of an encoded device share.
pub const ENCODED_PREFIX: &str = "vmbds1.";

const LABEL: &[u8; 8] = b"VMBDS1\0\0";
const MAC_LEN: usize = 32;

/// Why a device share is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceShareError {
    /// Not a device share's encoding, or a placement no host makes.
    #[error("malformed device share: {0}")]
    Malformed(&'static str),
    /// The MAC does not match: another cloud's key, or altered content.
    #[error(
        "device share signature is invalid (forged, altered or signed with another cloud's key)"
    )]
    Forged,
    /// It belongs to another migration than the ticket's.
    #[error("the device share is for {found}, the ticket for {expected}")]
    OtherMigration {
        /// What the ticket says.
        expected: String,
        /// What the share says.
        found: String,
    },
    /// It is addressed to another cloud VM.
    #[error("the device share is for cloud VM {found}, this is {expected}")]
    WrongCloudVm {
        /// This cloud VM, as the host knows it.
        expected: CloudVmId,
        /// The share's destination.
        found: CloudVmId,
    },
}

/// The host-device pool's part of a ticket (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceShare {
    /// The migrating guest.
    pub guest: DomainUuid,
    /// The destination cloud VM the host plugged the device into.
    pub dest: CloudVmId,
    /// The nonce of the ticket this share goes with.
    pub ticket_nonce: Nonce,
    /// Where the device sits in the destination.
    pub placement: Placement,
    /// What the destination checks the control page against.
    pub proof: ControlToken,
}

impl DeviceShare {
    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(192);
        out.extend_from_slice(LABEL);
        for s in [
            self.guest.as_str(),
            self.dest.0.as_str(),
            &self.placement.addr.to_string(),
        ] {
            // Each is at most 36 bytes: a UUID or a PCI address.
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.ticket_nonce.0);
        for n in [
            self.placement.bar_size,
            self.placement.ram_offset,
            self.placement.control_offset,
        ] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.extend_from_slice(&self.proof.nonce.0);
        out.extend_from_slice(&self.proof.sha256);
        out
    }

    /// The signed, printable form.
    pub fn encode(&self, key: &TicketKey) -> String {
        let mut bytes = self.body();
        let mac = key.sign(&bytes);
        bytes.extend_from_slice(&mac);
        format!("{ENCODED_PREFIX}{}", b64::encode(&bytes))
    }

    /// Parses and authenticates `text` (made by [`Self::encode`] under `key`).
    pub fn decode(text: &str, key: &TicketKey) -> Result<Self, DeviceShareError> {
        use DeviceShareError::Malformed;
        let data = text
            .trim()
            .strip_prefix(ENCODED_PREFIX)
            .ok_or(Malformed("missing vmbds1. prefix"))?;
        let bytes = b64::decode(data).ok_or(Malformed("not base64url"))?;
        if bytes.len() < LABEL.len() + MAC_LEN {
            return Err(Malformed("too short"));
        }
        let (body, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        if !key.verify_signature(body, mac) {
            return Err(DeviceShareError::Forged);
        }
        let mut r = Reader(body);
        if r.take(LABEL.len())? != LABEL {
            return Err(Malformed("label"));
        }
        let guest = DomainUuid::new(&r.string()?).map_err(|_| Malformed("guest"))?;
        let dest = DomainUuid::new(&r.string()?).map_err(|_| Malformed("destination"))?;
        let addr: PciAddress = r.string()?.parse().map_err(|_| Malformed("address"))?;
        let ticket_nonce = Nonce(r.array()?);
        let (bar_size, ram_offset, control_offset) = (r.u64()?, r.u64()?, r.u64()?);
        let proof = ControlToken {
            nonce: Nonce(r.array()?),
            sha256: r.array()?,
        };
        if !r.0.is_empty() {
            return Err(Malformed("trailing bytes"));
        }
        // Only a placement a host makes: a power-of-two BAR holding RAM and the control
        // page, the RAM at 0, the control page last.
        if !bar_size.is_power_of_two() || bar_size < 2 * CONTROL_PAGE {
            return Err(Malformed("BAR size"));
        }
        let placement = Placement::new(addr, bar_size);
        if (ram_offset, control_offset) != (placement.ram_offset, placement.control_offset) {
            return Err(Malformed("layout"));
        }
        let share = Self {
            guest,
            dest: CloudVmId(dest),
            ticket_nonce,
            placement,
            proof,
        };
        // One encoding per share (as for tickets).
        if share.body() != body {
            return Err(Malformed("not canonically encoded"));
        }
        Ok(share)
    }

    /// Binds the share to `ticket` (already verified) and to this cloud VM `me`.
    pub fn check(&self, ticket: &Ticket, me: &CloudVmId) -> Result<(), DeviceShareError> {
        if self.guest != ticket.domain_uuid || self.ticket_nonce != ticket.nonce {
            return Err(DeviceShareError::OtherMigration {
                expected: format!("guest {} ticket {}", ticket.domain_uuid, ticket.nonce),
                found: format!("guest {} ticket {}", self.guest, self.ticket_nonce),
            });
        }
        if &self.dest != me {
            return Err(DeviceShareError::WrongCloudVm {
                expected: me.clone(),
                found: self.dest.clone(),
            });
        }
        Ok(())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DeviceShareError> {
        if self.0.len() < n {
            return Err(DeviceShareError::Malformed("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DeviceShareError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u64(&mut self) -> Result<u64, DeviceShareError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, DeviceShareError> {
        let len = usize::from(self.take(1)?[0]);
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| DeviceShareError::Malformed("not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_page::ControlProof;
    use crate::ids::{CloudId, FileIdentity, HostId};
    use crate::ticket::TicketFields;

    const GUEST: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";
    const A2: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a2";

    fn key() -> TicketKey {
        TicketKey::from_bytes(vec![7; 32]).unwrap()
    }

    fn ticket() -> Ticket {
        Ticket::issue(
            &key(),
            TicketFields {
                cloud: CloudId::new("acme").unwrap(),
                domain_uuid: DomainUuid::new(GUEST).unwrap(),
                domain_name: "web1".into(),
                pool_file: String::new(),
                pool_identity: FileIdentity { dev: 0, ino: 0 },
                source_host: HostId::new("cvm1").unwrap(),
                dest_host: HostId::new(A2).unwrap(),
                ttl_secs: 60,
            },
            1_000,
        )
        .unwrap()
    }

    fn share(t: &Ticket) -> DeviceShare {
        DeviceShare {
            guest: t.domain_uuid.clone(),
            dest: CloudVmId(DomainUuid::new(A2).unwrap()),
            ticket_nonce: t.nonce,
            placement: Placement::new(PciAddress::root_slot(0x1e), 64 << 20),
            proof: ControlProof::fresh().token(),
        }
    }

    #[test]
    fn a_share_round_trips_and_binds_to_its_ticket_and_destination() {
        let t = ticket();
        let s = share(&t);
        let text = s.encode(&key());
        assert!(text.starts_with(ENCODED_PREFIX));
        let back = DeviceShare::decode(&text, &key()).unwrap();
        assert_eq!(back, s);
        back.check(&t, &s.dest).unwrap();

        let other_ticket = ticket();
        assert!(matches!(
            back.check(&other_ticket, &s.dest),
            Err(DeviceShareError::OtherMigration { .. })
        ));
        let a1 = CloudVmId(DomainUuid::new("5f0c2b5e-1a2b-4c3d-8e4f-0000000000a1").unwrap());
        assert!(matches!(
            back.check(&t, &a1),
            Err(DeviceShareError::WrongCloudVm { .. })
        ));
    }

    #[test]
    fn forged_altered_or_odd_shares_are_refused() {
        let t = ticket();
        let s = share(&t);
        let other_key = TicketKey::from_bytes(vec![9; 32]).unwrap();
        assert_eq!(
            DeviceShare::decode(&s.encode(&other_key), &key()),
            Err(DeviceShareError::Forged)
        );
        let text = s.encode(&key());
        let raw = b64::decode(&text[ENCODED_PREFIX.len()..]).unwrap();
        for i in [0, 9, 20, raw.len() - 40, raw.len() - 1] {
            let mut bad = raw.clone();
            bad[i] ^= 0x20;
            let bad = format!("{ENCODED_PREFIX}{}", b64::encode(&bad));
            assert_eq!(
                DeviceShare::decode(&bad, &key()),
                Err(DeviceShareError::Forged),
                "byte {i}"
            );
        }
        for bad in ["", "vmbt1.AAAA", "vmbds1.!!", "vmbds1.AAAA"] {
            assert!(
                matches!(
                    DeviceShare::decode(bad, &key()),
                    Err(DeviceShareError::Malformed(_))
                ),
                "{bad}"
            );
        }
        // A layout no host makes, even signed with the cloud's key.
        let mut odd = share(&t);
        odd.placement.bar_size = 3 << 20;
        assert_eq!(
            DeviceShare::decode(&odd.encode(&key()), &key()),
            Err(DeviceShareError::Malformed("BAR size"))
        );
        let mut odd = share(&t);
        odd.placement.control_offset = 0;
        assert_eq!(
            DeviceShare::decode(&odd.encode(&key()), &key()),
            Err(DeviceShareError::Malformed("layout"))
        );
    }
}
