//! Who is talking: entity names (`osd.3`, `mon.0`, `client.4121`) and the addresses sessions are keyed by.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The kind of daemon or program behind a messenger. Policies are chosen per peer type, as in Ceph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EntityType {
    Mon,
    Osd,
    Client,
}

impl EntityType {
    pub const ALL: [EntityType; 3] = [EntityType::Mon, EntityType::Osd, EntityType::Client];

    pub fn as_str(self) -> &'static str {
        match self {
            EntityType::Mon => "mon",
            EntityType::Osd => "osd",
            EntityType::Client => "client",
        }
    }
}

/// A messenger's identity: its type and number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntityName {
    pub ty: EntityType,
    pub num: u64,
}

impl EntityName {
    pub fn new(ty: EntityType, num: u64) -> EntityName {
        EntityName { ty, num }
    }
    pub fn osd(num: u64) -> EntityName {
        EntityName::new(EntityType::Osd, num)
    }
    pub fn mon(num: u64) -> EntityName {
        EntityName::new(EntityType::Mon, num)
    }
    pub fn client(num: u64) -> EntityName {
        EntityName::new(EntityType::Client, num)
    }
}

impl fmt::Display for EntityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.ty.as_str(), self.num)
    }
}

/// A peer's name for logs and messages: `client.4123`, or `unidentified` before its handshake names it.
pub fn shown_peer(name: Option<EntityName>) -> String {
    name.map_or_else(|| "unidentified".to_string(), |n| n.to_string())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad entity name {0:?}: expected TYPE.NUM with TYPE one of mon, osd, client")]
pub struct ParseEntityError(pub String);

impl FromStr for EntityName {
    type Err = ParseEntityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseEntityError(s.to_string());
        let (ty, num) = s.split_once('.').ok_or_else(bad)?;
        let ty = EntityType::ALL.into_iter().find(|t| t.as_str() == ty).ok_or_else(bad)?;
        let num = num.parse().map_err(|_| bad())?;
        Ok(EntityName { ty, num })
    }
}

/// What a session is keyed by on both sides. A peer that listens is known by its listening address (so an
/// outgoing connect and that peer's incoming connect find the same session, which is how connect races are
/// resolved); a peer that never binds (a client) is known by its name and the random nonce of its messenger
/// instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PeerKey {
    Listening(SocketAddr),
    Anonymous(EntityName, u64),
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::Listening(a) => write!(f, "{a}"),
            PeerKey::Anonymous(n, nonce) => write!(f, "{n}/{nonce:x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_display() {
        for s in ["osd.3", "mon.0", "client.4121"] {
            assert_eq!(s.parse::<EntityName>().unwrap().to_string(), s);
        }
        for bad in ["osd", "osd.x", "disk.1", ".1", ""] {
            assert!(bad.parse::<EntityName>().is_err(), "{bad}");
        }
    }
}
