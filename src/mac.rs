//! MAC addresses: the one parser for the spellings manifests and OVF descriptors use, and the
//! one spelling libvirt is given. Owns only the address itself; whether a NIC may have it is
//! [`MacAddress::is_usable_for_nic`], what to do about one that is not belongs to the caller.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Six octets, written `00:50:56:aa:bb:cc` (lower-case, colons: libvirt's spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress([u8; 6]);

/// Text that is not a MAC address in any spelling [`MacAddress`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("not a MAC address: write six two-digit hex octets, as 00:50:56:aa:bb:cc, 00-50-56-AA-BB-CC or 005056aabbcc")]
pub struct ParseMacError;

impl MacAddress {
    /// The address from its octets.
    pub fn new(octets: [u8; 6]) -> MacAddress {
        MacAddress(octets)
    }

    /// The six octets.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Whether libvirt accepts it for a guest NIC: it refuses multicast addresses and reserves
    /// a leading 0xFE for the host side of tap devices; all zeros is no address at all.
    pub fn is_usable_for_nic(self) -> bool {
        self.0[0] & 1 == 0 && self.0[0] != 0xfe && self.0 != [0; 6]
    }
}

impl FromStr for MacAddress {
    type Err = ParseMacError;

    /// Reads `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` (some cloud APIs) and `aabbccddeeff`
    /// (VirtualBox, some OVFs), in either case, with surrounding white space. One separator
    /// throughout, two digits per octet: anything looser is more likely a typo than a MAC.
    fn from_str(text: &str) -> Result<MacAddress, ParseMacError> {
        let text = text.trim();
        let digits: Vec<&str> = match [':', '-'].into_iter().find(|&c| text.contains(c)) {
            Some(separator) => text.split(separator).collect(),
            None if text.len() == 12 && text.is_ascii() => (0..6).map(|i| &text[2 * i..2 * i + 2]).collect(),
            None => return Err(ParseMacError),
        };
        if digits.len() != 6 {
            return Err(ParseMacError);
        }
        let mut octets = [0u8; 6];
        for (octet, pair) in octets.iter_mut().zip(digits) {
            if pair.len() != 2 || !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ParseMacError);
            }
            *octet = u8::from_str_radix(pair, 16).map_err(|_| ParseMacError)?;
        }
        Ok(MacAddress(octets))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl serde::Serialize for MacAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Option<String> {
        text.parse::<MacAddress>().ok().map(|m| m.to_string())
    }

    #[test]
    fn every_spelling_reads_as_libvirts() {
        for text in [
            "00:50:56:aa:bb:cc",
            "00:50:56:AA:bb:CC",
            "00-50-56-AA-BB-CC",
            "005056aabbcc",
            "005056AABBCC",
            " 00:50:56:aa:bb:cc\n",
        ] {
            assert_eq!(parsed(text).as_deref(), Some("00:50:56:aa:bb:cc"), "{text:?}");
        }
    }

    #[test]
    fn anything_looser_is_refused() {
        for bad in [
            "",
            "0",
            "00:50:56:ab:cd",
            "00:50:56:ab:cd:01:02",
            "00:50:56:ab:cd:0g",
            "0:50:56:ab:cd:01",
            "+0:50:56:ab:cd:01",
            "00:50-56:ab:cd:01",
            "0050:56aa:bb01",
            "005056aabbc",
            "005056aabbccd",
            "00505éaabbc",
            "x' onload='y",
        ] {
            assert_eq!(bad.parse::<MacAddress>(), Err(ParseMacError), "{bad:?}");
        }
    }

    #[test]
    fn only_unicast_addresses_are_usable_for_a_nic() {
        assert!("00:50:56:ab:cd:01".parse::<MacAddress>().unwrap().is_usable_for_nic());
        for unusable in ["01:00:5e:00:00:01", "fe:54:00:12:34:56", "00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"] {
            assert!(!unusable.parse::<MacAddress>().unwrap().is_usable_for_nic(), "{unusable}");
        }
    }
}
