//! Identifiers: images (`ImageId`, `ImageRef`), IDCs, chunk indexes, roles and policies.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Index of a chunk within an image.
pub type ChunkIndex = u32;

/// SHA-256 of an image's canonical manifest bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ImageId(pub [u8; 32]);

impl ImageId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// First 12 hex digits, for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageId({})", self.short())
    }
}

impl FromStr for ImageId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = hex::decode(s).map_err(|e| format!("image id {s:?} is not hex: {e}"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("image id {s:?} must be 64 hex digits"))?;
        Ok(ImageId(arr))
    }
}

const MAX_NAME_LEN: usize = 128;

fn check_name_part(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} must be 1 to {MAX_NAME_LEN} characters, got {s:?}"
        ));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
    {
        return Err(format!(
            "{what} {s:?} may only hold ASCII letters, digits, '-', '_', '.', '+'"
        ));
    }
    Ok(())
}

/// `name:version`, the human name of one image version.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ImageRef {
    pub name: String,
    pub version: String,
}

impl ImageRef {
    pub fn new(name: &str, version: &str) -> Result<Self, String> {
        check_name_part("image name", name)?;
        check_name_part("image version", version)?;
        Ok(ImageRef {
            name: name.to_string(),
            version: version.to_string(),
        })
    }
    /// Checks a decoded value (e.g. from the network) obeys the same rules as `new`.
    pub fn validate(&self) -> Result<(), String> {
        check_name_part("image name", &self.name)?;
        check_name_part("image version", &self.version)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.version)
    }
}
impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for ImageRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, version) = s
            .split_once(':')
            .ok_or_else(|| format!("image reference {s:?} must be NAME:VERSION"))?;
        ImageRef::new(name, version)
    }
}

/// Name of an independent data center, e.g. `A` or `eu-west-1`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Idc(pub String);

impl Idc {
    pub fn new(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 64 {
            return Err(format!("IDC name must be 1 to 64 characters, got {s:?}"));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "IDC name {s:?} may only hold ASCII letters, digits, '-', '_', '.'"
            ));
        }
        Ok(Idc(s.to_string()))
    }
    pub fn validate(&self) -> Result<(), String> {
        Idc::new(&self.0).map(|_| ())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for Idc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Idc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Idc({})", self.0)
    }
}
impl FromStr for Idc {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Idc::new(s)
    }
}

/// The role of a host in a host list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An ordinary host; never talks to other IDCs.
    Host,
    /// A designated bridgehead: holds a valid certificate and may talk to other IDCs' bridgeheads.
    Bridgehead,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Host => "host",
            Role::Bridgehead => "bridgehead",
        })
    }
}

/// Distribution policy: BIDS (bridgeheads only across IDCs) or the paper's Baseline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Bids,
    /// Evaluation only: the IDC rule is off, any host dials any host.
    Baseline,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Bids => "bids",
            Policy::Baseline => "baseline",
        })
    }
}
impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bids" => Ok(Policy::Bids),
            "baseline" => Ok(Policy::Baseline),
            _ => Err(format!("policy must be 'bids' or 'baseline', got {s:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ref_parses_and_rejects() {
        let r: ImageRef = "debian:12.1".parse().unwrap();
        assert_eq!(r.name, "debian");
        assert_eq!(r.version, "12.1");
        assert!("debian".parse::<ImageRef>().is_err());
        assert!(":1".parse::<ImageRef>().is_err());
        assert!("a b:1".parse::<ImageRef>().is_err());
        assert!("a:1:2".parse::<ImageRef>().is_err());
    }

    #[test]
    fn image_id_hex_round_trip() {
        let id = ImageId([7; 32]);
        assert_eq!(id.to_hex().parse::<ImageId>().unwrap(), id);
        assert!("zz".parse::<ImageId>().is_err());
    }
}
