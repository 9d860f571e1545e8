//! The guest's first network packets, read from the pcap file qemu's `filter-dump` writes as
//! the guest runs: the boot check's signal for guests without a serial console. A guest whose
//! userspace brought its network up sends a DHCP request, an IPv6 router or neighbour
//! solicitation, or an ARP from its own MAC; the first such frame is the evidence.
//!
//! The file's framing is qemu's, but every frame's bytes are the guest's: hostile input. Only
//! a capped prefix of the file is read, lengths are checked before use, and a frame is only
//! classified from the bytes it has. The format is small (a 24-byte header, then a 16-byte
//! header per record) and parsed here rather than with a crate (docs/DECISIONS.md).

use crate::mac::MacAddress;

/// Only the first frames matter; a file past this is not read further.
pub const MAX_READ_BYTES: usize = 4 * 1024 * 1024;
/// A record longer than this is not one qemu wrote (its snap length is 65535).
const MAX_RECORD_BYTES: usize = 256 * 1024;
/// LINKTYPE_ETHERNET.
const ETHERNET: u32 = 1;

/// What a frame from the guest was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPacket {
    /// The MAC it came from.
    pub mac: MacAddress,
    /// `DHCP request`, `IPv6 router solicitation`, `ARP`, … (see [`kind`]).
    pub kind: String,
    /// Sent by the firmware's network boot (a DHCP request of a `PXEClient`), not the guest's
    /// operating system: no sign that it booted.
    pub firmware: bool,
}

/// Why the file is not a pcap qemu could have written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcapError {
    /// The first four bytes are no pcap magic number.
    #[error("not a pcap file (magic {0:02x?})")]
    Magic([u8; 4]),
    /// The capture is not of Ethernet frames.
    #[error("the capture's link type is {0}, not Ethernet")]
    LinkType(u32),
    /// A record header claims more bytes than qemu captures.
    #[error("a record claims {0} bytes, more than a capture of qemu holds")]
    Record(usize),
}

/// The frames sent from one of `macs`, in order, as far as `bytes` (the file so far, which
/// may end inside a record while qemu writes) holds whole records. An empty or short header
/// is no frames yet.
pub fn guest_packets(bytes: &[u8], macs: &[MacAddress]) -> Result<Vec<GuestPacket>, PcapError> {
    let bytes = &bytes[..bytes.len().min(MAX_READ_BYTES)];
    let Some(header) = bytes.get(..24) else { return Ok(Vec::new()) };
    let big_endian = match header[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
        _ => return Err(PcapError::Magic([header[0], header[1], header[2], header[3]])),
    };
    let u32_at = |b: &[u8], at: usize| -> u32 {
        let word = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if big_endian {
            u32::from_be_bytes(word)
        } else {
            u32::from_le_bytes(word)
        }
    };
    let link = u32_at(header, 20);
    if link != ETHERNET {
        return Err(PcapError::LinkType(link));
    }
    let mut found = Vec::new();
    let mut at = 24;
    while let Some(record) = bytes.get(at..at + 16) {
        let len = u32_at(record, 8) as usize;
        if len > MAX_RECORD_BYTES {
            return Err(PcapError::Record(len));
        }
        let Some(frame) = bytes.get(at + 16..at + 16 + len) else { break };
        at += 16 + len;
        if let Some(mac) = frame.get(6..12).and_then(|src| macs.iter().find(|m| m.octets() == src)) {
            let kind = kind(frame);
            let firmware = kind.starts_with("PXE");
            found.push(GuestPacket { mac: *mac, kind, firmware });
        }
    }
    Ok(found)
}

/// What an Ethernet frame is, from the bytes it has (a short frame is named by what is known).
pub fn kind(frame: &[u8]) -> String {
    let mut at = 12;
    let mut ethertype = be16(frame, at);
    if ethertype == Some(0x8100) {
        at += 4;
        ethertype = be16(frame, at);
    }
    let payload = frame.get(at + 2..).unwrap_or_default();
    match ethertype {
        Some(0x0806) => "ARP".into(),
        Some(0x0800) => ipv4(payload),
        Some(0x86dd) => ipv6(payload),
        Some(other) => format!("Ethernet type 0x{other:04x}"),
        None => "a short frame".into(),
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at.checked_add(1)?)?]))
}

fn ipv4(p: &[u8]) -> String {
    let header = p.first().map(|b| usize::from(b & 0x0f) * 4).unwrap_or(0);
    match (p.get(9), be16(p, header + 2)) {
        (Some(17), Some(67)) if pxe_client(p.get(header + 8..).unwrap_or_default()) => "PXE DHCP request".into(),
        (Some(17), Some(67)) => "DHCP request".into(),
        (Some(17), Some(53)) => "DNS query".into(),
        (Some(1), _) => "ICMP packet".into(),
        _ => "IPv4 packet".into(),
    }
}

/// Whether a DHCP message's vendor class (option 60) is a PXE client's: firmware (iPXE,
/// OVMF) asking for a network boot.
fn pxe_client(dhcp: &[u8]) -> bool {
    // The fixed BOOTP part, then the magic cookie 99.130.83.99, then options.
    const OPTIONS: usize = 240;
    if dhcp.get(236..240) != Some(&[99, 130, 83, 99][..]) {
        return false;
    }
    let mut at = OPTIONS;
    while let Some(&code) = dhcp.get(at) {
        match code {
            0 => at += 1,
            255 => return false,
            _ => {
                let Some(&len) = dhcp.get(at + 1) else { return false };
                let data = dhcp.get(at + 2..at + 2 + usize::from(len)).unwrap_or_default();
                if code == 60 {
                    return data.starts_with(b"PXEClient");
                }
                at += 2 + usize::from(len);
            }
        }
    }
    false
}

fn ipv6(p: &[u8]) -> String {
    let (mut next, mut at) = (p.get(6).copied(), 40);
    // One hop-by-hop options header (MLD reports carry one).
    if next == Some(0) {
        next = p.get(at).copied();
        at += p.get(at + 1).map(|l| (usize::from(*l) + 1) * 8).unwrap_or(0);
    }
    match (next, p.get(at)) {
        (Some(58), Some(133)) => "IPv6 router solicitation".into(),
        (Some(58), Some(135)) => "IPv6 neighbour solicitation".into(),
        (Some(58), Some(143)) => "IPv6 multicast listener report".into(),
        (Some(17), _) if be16(p, at + 2) == Some(547) => "DHCPv6 request".into(),
        _ => "IPv6 packet".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const SLIRP: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

    fn mac() -> MacAddress {
        MacAddress::new(GUEST)
    }

    fn header() -> Vec<u8> {
        let mut h = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        h.extend([0; 8]);
        h.extend(65535u32.to_le_bytes());
        h.extend(ETHERNET.to_le_bytes());
        h
    }

    fn record(out: &mut Vec<u8>, frame: &[u8]) {
        out.extend([0; 8]);
        out.extend((frame.len() as u32).to_le_bytes());
        out.extend((frame.len() as u32).to_le_bytes());
        out.extend(frame);
    }

    fn frame(src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend(src);
        f.extend(ethertype.to_be_bytes());
        f.extend(payload);
        f
    }

    fn dhcp_discover() -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255];
        ip.extend([0, 68, 0, 67, 0, 8, 0, 0]);
        ip
    }

    fn router_solicitation() -> Vec<u8> {
        let mut ip = vec![0x60, 0, 0, 0, 0, 8, 58, 255];
        ip.extend([0; 32]);
        ip.extend([133, 0, 0, 0, 0, 0, 0, 0]);
        ip
    }

    #[test]
    fn the_guests_frames_are_found_and_named_and_slirps_are_not() {
        let mut pcap = header();
        record(&mut pcap, &frame(SLIRP, 0x0806, &[0; 28]));
        record(&mut pcap, &frame(GUEST, 0x86dd, &router_solicitation()));
        record(&mut pcap, &frame(GUEST, 0x0800, &dhcp_discover()));
        record(&mut pcap, &frame(GUEST, 0x0806, &[0; 28]));
        let kinds: Vec<String> = guest_packets(&pcap, &[mac()]).unwrap().into_iter().map(|p| p.kind).collect();
        assert_eq!(kinds, ["IPv6 router solicitation", "DHCP request", "ARP"]);
    }

    #[test]
    fn a_pxe_firmwares_dhcp_request_is_told_apart() {
        let mut pxe = dhcp_discover();
        pxe.extend([0; 236]);
        pxe.extend([99, 130, 83, 99, 53, 1, 1, 0, 60, 9]);
        pxe.extend(b"PXEClient:Arch:00000");
        pxe.push(255);
        let mut pcap = header();
        record(&mut pcap, &frame(GUEST, 0x0800, &pxe));
        record(&mut pcap, &frame(GUEST, 0x0800, &dhcp_discover()));
        let found = guest_packets(&pcap, &[mac()]).unwrap();
        let seen: Vec<(&str, bool)> = found.iter().map(|p| (p.kind.as_str(), p.firmware)).collect();
        assert_eq!(seen, [("PXE DHCP request", true), ("DHCP request", false)]);
        for cut in 0..pxe.len() {
            let _ = pxe_client(&pxe[28..cut.max(28)]);
        }
    }

    #[test]
    fn a_file_still_being_written_gives_the_whole_records_only() {
        let mut pcap = header();
        record(&mut pcap, &frame(GUEST, 0x0800, &dhcp_discover()));
        let whole = pcap.len();
        record(&mut pcap, &frame(GUEST, 0x0806, &[0; 28]));
        for cut in [0, 10, 24, 30, whole, whole + 5, pcap.len() - 1] {
            let n = guest_packets(&pcap[..cut], &[mac()]).unwrap().len();
            assert_eq!(n, usize::from(cut >= whole), "cut at {cut}");
        }
    }

    #[test]
    fn what_qemu_would_not_write_is_refused() {
        assert!(matches!(guest_packets(&[0x7f; 24], &[mac()]), Err(PcapError::Magic(_))));
        let mut raw_ip = header();
        raw_ip[20] = 101;
        assert_eq!(guest_packets(&raw_ip, &[mac()]), Err(PcapError::LinkType(101)));
        let mut huge = header();
        huge.extend([0; 8]);
        huge.extend(u32::MAX.to_le_bytes());
        huge.extend([0; 4]);
        assert!(matches!(guest_packets(&huge, &[mac()]), Err(PcapError::Record(_))));
    }

    #[test]
    fn short_and_odd_frames_do_not_panic() {
        for len in 0..80 {
            let mut f = frame(GUEST, 0x86dd, &[0; 80]);
            f[20] = 0; // hop-by-hop, whose length byte points past the end
            f.truncate(len);
            let _ = kind(&f);
            let mut v4 = frame(GUEST, 0x0800, &[0xff; 80]);
            v4.truncate(len);
            let _ = kind(&v4);
        }
        assert_eq!(kind(&frame(GUEST, 0x88cc, &[])), "Ethernet type 0x88cc");
        assert_eq!(kind(&GUEST), "a short frame");
    }
}
