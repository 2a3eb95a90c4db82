//! Address ranges as settings name them (`KRUN_MESH_CIDRS`): `10.8.0.0/14`, `fd00::/8`, a
//! bare address (one host) or `*` (every address).

use std::fmt;
use std::net::IpAddr;

use mesh::config::table::Show;
use mesh::config::values;
use serde_json::{Value, json};

/// An address range such as `10.0.0.0/8`; `*` is every address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cidr {
    /// Every address.
    Any,
    /// `addr/len`.
    Net(IpAddr, u8),
}

impl Cidr {
    const FORM: &str = "a comma-separated list of CIDRs such as 10.8.0.0/14,fd00::/8 (a bare address is one host, * is every address)";

    /// Parses a comma-separated list; any entry that is not a range fails the whole list.
    pub fn parse_list(raw: &str) -> Result<Vec<Cidr>, &'static str> {
        values::list(raw)
            .iter()
            .map(|item| Cidr::parse(item).ok_or(Self::FORM))
            .collect()
    }

    fn parse(item: &str) -> Option<Cidr> {
        if item == "*" {
            return Some(Cidr::Any);
        }
        let (addr, len) = item.split_once('/').unwrap_or((item, ""));
        let addr: IpAddr = addr.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if len.is_empty() {
            max
        } else {
            len.parse().ok()?
        };
        (len <= max).then_some(Cidr::Net(addr, len))
    }

    /// True when `ip` is inside the range.
    pub fn contains(self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Cidr::Any, _) => true,
            (Cidr::Net(IpAddr::V4(net), len), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (Cidr::Net(IpAddr::V6(net), len), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cidr::Any => f.write_str("*"),
            Cidr::Net(addr, len) => write!(f, "{addr}/{len}"),
        }
    }
}

impl Show for Cidr {
    fn show(&self) -> Value {
        json!(self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges, hosts and `*` parse; membership follows the prefix length.
    #[test]
    fn ranges() {
        let ranges = Cidr::parse_list("10.0.0.0/8, fd00::/8, 192.168.1.1").expect("valid");
        assert_eq!(ranges.len(), 3);
        let inside = |ip: &str| {
            let ip: IpAddr = ip.parse().expect("ip");
            ranges.iter().any(|r| r.contains(ip))
        };
        assert!(inside("10.1.2.3"));
        assert!(!inside("11.0.0.1"));
        assert!(inside("fd12::1"));
        assert!(inside("192.168.1.1"));
        assert!(!inside("192.168.1.2"));
        let any = Cidr::parse_list("*").expect("valid");
        assert!(any[0].contains("8.8.8.8".parse().expect("ip")));
        let all = Cidr::parse_list("0.0.0.0/0").expect("valid");
        assert!(all[0].contains("8.8.8.8".parse().expect("ip")));
        assert_eq!(Cidr::parse_list("").expect("valid"), Vec::new());
    }

    /// One bad entry fails the list, with the expected form.
    #[test]
    fn a_bad_entry_fails_the_list() {
        for bad in [
            "10.0.0.0/8,bogus",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/x",
        ] {
            let e = Cidr::parse_list(bad).expect_err(bad);
            assert!(e.contains("CIDRs such as 10.8.0.0/14"), "{e}");
        }
    }
}
