//! What a job's runs may reach beyond the agent's egress policy: `"egress": {"allow": [ranges]}`
//! in the job (set by an admin; a repository's config file cannot widen it). The agent denies
//! its private ranges to every run; a job that needs one of them (a package mirror, a database
//! for integration tests) lists it here, as narrowly as it can.

use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 range, `a.b.c.d/n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    address: Ipv4Addr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not an IPv4 range such as 10.0.0.0/8 or 10.1.2.3/32");
        let (address, prefix) = text.trim().split_once('/').ok_or_else(bad)?;
        let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().ok().filter(|prefix| *prefix <= 32).ok_or_else(bad)?;
        Ok(Cidr { address, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A job's exceptions to the agent's egress policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Egress {
    /// IPv4 ranges the job's runs reach although the agent denies them (at most 16).
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>, example = json!(["10.20.0.5/32"])))]
    #[serde(deserialize_with = "allow_list")]
    pub allow: Vec<Cidr>,
}

impl Egress {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty()
    }
}

fn allow_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Cidr>, D::Error> {
    let allow = Vec::<Cidr>::deserialize(d)?;
    if allow.len() > 16 {
        return Err(serde::de::Error::custom("egress.allow lists at most 16 ranges"));
    }
    Ok(allow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_print_back() {
        assert_eq!("172.16.0.0/12".parse::<Cidr>().unwrap().to_string(), "172.16.0.0/12");
        for bad in ["10.0.0.0", "10.0.0.0/33", "example.com/8", "10.0.0/8", "::1/128"] {
            assert!(bad.parse::<Cidr>().unwrap_err().contains("IPv4 range"), "{bad}");
        }
        let egress: Egress = serde_json::from_value(serde_json::json!({"allow": ["10.1.2.3/32"]})).unwrap();
        assert_eq!(serde_json::to_value(&egress).unwrap(), serde_json::json!({"allow": ["10.1.2.3/32"]}));
        assert!(serde_json::from_value::<Egress>(serde_json::json!({"allow": ["10.1.2.3"]})).is_err());
        assert!(serde_json::from_value::<Egress>(serde_json::json!({"deny": []})).is_err());
    }
}
