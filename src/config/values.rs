//! Value types more than one area parses: [`FullMatch`] (hook rules, per-repository
//! secrets) and [`Cidr`] (a target's private networks, a hook's source networks).
//!
//! A leaf: each type checks itself while it is deserialized, so a bad value is refused at
//! its own line and column.

use regex::Regex;
use serde::{Deserialize, Deserializer};

/// A regex that must match the whole value: `latest` does not accept `latest-foo`
/// (webhook-proxy's `re.match` did).
#[derive(Debug, Clone)]
pub struct FullMatch(pub Regex);

impl FullMatch {
    pub fn new(raw: &str) -> Result<FullMatch, String> {
        Regex::new(&format!("^(?:{raw})$"))
            .map(FullMatch)
            .map_err(|e| format!("invalid regex {raw:?}: {e}"))
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.0.is_match(value)
    }
}

impl<'de> Deserialize<'de> for FullMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        FullMatch::new(&raw).map_err(serde::de::Error::custom)
    }
}

/// A network, `ADDR/PREFIX` or a bare address (a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    /// The address with its host bits cleared.
    pub fn network(&self) -> std::net::IpAddr {
        use std::net::IpAddr::*;
        match self.addr {
            V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                V4((u32::from(a) & mask).into())
            }
            V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                V6((u128::from(a) & mask).into())
            }
        }
    }
}

/// `ADDR/PREFIX`, or the bare address for a single host: the form nginx's `allow` takes.
impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == max {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        let bad = || format!("invalid CIDR {raw:?}");
        let (addr, prefix) = raw.split_once('/').unwrap_or((raw, ""));
        let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix.parse::<u8>().map_err(|_| bad())?
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}
