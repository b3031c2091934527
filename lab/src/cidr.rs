//! IPv4 prefixes, written `a.b.c.d/n` in lab files.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 prefix with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// Panics if `prefix > 32`; host bits of `addr` are cleared.
    pub const fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        assert!(prefix <= 32);
        let bits = addr.to_bits() & mask(prefix);
        Self {
            network: Ipv4Addr::from_bits(bits),
            prefix,
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }

    /// The `n`th address of the prefix, if inside it.
    pub fn nth(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from_bits(self.network.to_bits() + n as u32))
    }

    /// The `index`th sub-prefix of length `prefix`.
    pub fn subnet(&self, prefix: u8, index: u64) -> Option<Ipv4Cidr> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let count = 1u64 << (prefix - self.prefix);
        (index < count).then(|| {
            let step = 1u64 << (32 - prefix);
            Ipv4Cidr::new(
                Ipv4Addr::from_bits(self.network.to_bits() + (index * step) as u32),
                prefix,
            )
        })
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        addr.to_bits() & mask(self.prefix) == self.network.to_bits()
    }

    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

const fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an IPv4 prefix (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{prefix:?} is not a prefix length (0-32)"))?;
        let cidr = Ipv4Cidr::new(addr, prefix);
        if cidr.network != addr {
            return Err(format!("{s} has host bits set (did you mean {cidr}?)"));
        }
        Ok(cidr)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_arithmetic() {
        let c: Ipv4Cidr = "10.244.0.0/16".parse().unwrap();
        assert_eq!(c.size(), 65536);
        assert_eq!(c.subnet(24, 3).unwrap().to_string(), "10.244.3.0/24");
        assert_eq!(c.subnet(24, 256), None);
        assert_eq!(c.nth(258), Some(Ipv4Addr::new(10, 244, 1, 2)));
        assert!(c.contains(Ipv4Addr::new(10, 244, 9, 9)));
        assert!(!c.contains(Ipv4Addr::new(10, 245, 0, 0)));
        assert!(c.overlaps(&"10.244.7.0/24".parse().unwrap()));
        assert!(!c.overlaps(&"10.96.0.0/16".parse().unwrap()));
        assert!(
            "10.244.0.1/16"
                .parse::<Ipv4Cidr>()
                .unwrap_err()
                .contains("host bits")
        );
        assert!("10.244.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.244.0.0".parse::<Ipv4Cidr>().is_err());
    }
}
