//! What tether stores in etcd, byte for byte.
//!
//! A service's key holds `{"Op":0,"Addr":"host:port","Metadata":"{\"id\":...}"}`
//! (gRPC-Go's `naming/endpoints` update, Op 0 = Add), with tether's fields
//! JSON-encoded into one string in `Metadata`: etcd's resolver copies
//! `Metadata` into `resolver.Address.Metadata`, which grpc-go hashes and
//! compares, so an object or array there panics the client ("hash of
//! unhashable type"). Values an earlier tether wrote with `Metadata` as an
//! object are still read (and rewritten in place by anti-entropy: the format
//! is part of the `fingerprint`). The agent key holds an `AgentRecord`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The value gRPC-Go's `naming/endpoints` manager writes and its resolver reads.
/// Serialized with `Metadata` as one JSON string; read from that or from the
/// earlier format with `Metadata` as an object (`legacy`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(into = "Wire", try_from = "Wire")]
pub struct EndpointUpdate {
    pub op: u8,
    pub addr: String,
    pub metadata: Metadata,
    /// Read from the earlier format (`Metadata` as a JSON object).
    pub legacy: bool,
}

/// tether's fields inside the endpoint's `Metadata`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    pub node: String,
    /// The agent's instance on its node, when several share a host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub managed_by: String,
    #[serde(default)]
    pub health: String,
    /// The service file's `weight`, for weighted clients (absent when not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// The stored JSON.
#[derive(Serialize, Deserialize)]
struct Wire {
    #[serde(rename = "Op")]
    op: u8,
    #[serde(rename = "Addr")]
    addr: String,
    #[serde(rename = "Metadata")]
    metadata: WireMetadata,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum WireMetadata {
    /// `Metadata` as a JSON-encoded string: hashable in grpc-go.
    Encoded(String),
    /// `Metadata` as an object, as an earlier tether wrote it.
    Legacy(Metadata),
}

impl From<EndpointUpdate> for Wire {
    fn from(v: EndpointUpdate) -> Wire {
        let metadata = WireMetadata::Encoded(serde_json::to_string(&v.metadata).expect("serializable"));
        Wire { op: v.op, addr: v.addr, metadata }
    }
}

impl TryFrom<Wire> for EndpointUpdate {
    type Error = serde_json::Error;

    fn try_from(w: Wire) -> std::result::Result<Self, Self::Error> {
        let (metadata, legacy) = match w.metadata {
            WireMetadata::Encoded(s) => (serde_json::from_str(&s)?, false),
            WireMetadata::Legacy(m) => (m, true),
        };
        Ok(EndpointUpdate { op: w.op, addr: w.addr, metadata, legacy })
    }
}

impl EndpointUpdate {
    /// The value's format, part of every fingerprint: a key in the earlier
    /// format never looks "in sync", so anti-entropy rewrites it in place.
    pub fn format(&self) -> &'static str {
        if self.legacy {
            "metadata-object"
        } else {
            "metadata-string"
        }
    }
}

/// What a key holds, as compared by the reconciler (see [`View`](crate::registry::View)): the key,
/// the value without its health (the health is compared apart), the lease
/// and the value's format. A listed key and a spec's are built by this one
/// function, so they are equal exactly when the key is in sync.
pub(super) fn fingerprint(key: &str, mut value: EndpointUpdate, lease: i64) -> String {
    value.metadata.health.clear();
    let format = value.format();
    format!("{key}|{}|lease:{lease}|{format}", serde_json::to_string(&value).expect("serializable"))
}

/// The agent key's value: who holds this identity, on which lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct AgentRecord {
    pub run: String,
    pub lease: i64,
    /// "alive", or "stopped" (a clean shutdown that left the keys to their TTL).
    pub state: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn metadata() -> Metadata {
        Metadata {
            id: "orders-1".into(),
            name: "orders".into(),
            tags: vec!["grpc".into()],
            meta: BTreeMap::from([("version".into(), "1.2.3".into())]),
            node: "web-1".into(),
            instance: None,
            managed_by: "tether".into(),
            health: "SERVING".into(),
            weight: None,
        }
    }

    fn metadata_json() -> Value {
        json!({"id": "orders-1", "name": "orders", "tags": ["grpc"], "meta": {"version": "1.2.3"}, "node": "web-1", "managed_by": "tether", "health": "SERVING"})
    }

    #[test]
    fn writes_metadata_as_one_json_string() {
        let v = EndpointUpdate { op: 0, addr: "10.0.0.5:50051".into(), metadata: metadata(), legacy: false };
        let written: Value = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        let encoded = written["Metadata"].as_str().expect("Metadata is a string, never an object or array");
        assert_eq!(serde_json::from_str::<Value>(encoded).unwrap(), metadata_json());
        assert_eq!(written["Op"], 0);
        assert_eq!(written["Addr"], "10.0.0.5:50051");
        assert_eq!(written.as_object().unwrap().len(), 3);
    }

    #[test]
    fn parses_the_string_format() {
        let raw = json!({"Op": 0, "Addr": "10.0.0.5:50051", "Metadata": metadata_json().to_string()});
        let v: EndpointUpdate = serde_json::from_value(raw).unwrap();
        assert_eq!(v, EndpointUpdate { op: 0, addr: "10.0.0.5:50051".into(), metadata: metadata(), legacy: false });
        assert_eq!(v.format(), "metadata-string");
        // Round trip.
        assert_eq!(serde_json::from_str::<EndpointUpdate>(&serde_json::to_string(&v).unwrap()).unwrap(), v);
    }

    #[test]
    fn parses_the_earlier_object_format_as_legacy() {
        let raw = json!({"Op": 0, "Addr": "10.0.0.5:50051", "Metadata": metadata_json()});
        let v: EndpointUpdate = serde_json::from_value(raw).unwrap();
        assert_eq!(v.metadata, metadata());
        assert!(v.legacy);
        assert_eq!(v.format(), "metadata-object");
        // Re-serialized, it is in the new format.
        let written: Value = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert!(written["Metadata"].is_string());
    }

    #[test]
    fn same_service_in_both_formats_differs_only_by_the_format_marker() {
        let new = EndpointUpdate { op: 0, addr: "10.0.0.5:50051".into(), metadata: metadata(), legacy: false };
        let old: EndpointUpdate = serde_json::from_value(json!({"Op": 0, "Addr": "10.0.0.5:50051", "Metadata": metadata_json()})).unwrap();
        // Serialized alike, so without the marker an old key would look in sync.
        assert_eq!(serde_json::to_string(&old).unwrap(), serde_json::to_string(&new).unwrap());
        assert_ne!(old.format(), new.format());
    }

    #[test]
    fn rejects_values_that_are_not_tethers() {
        for raw in [
            json!({"Op": 0, "Addr": "a:1", "Metadata": null}),
            json!({"Op": 0, "Addr": "a:1", "Metadata": "not json"}),
            json!({"Op": 0, "Addr": "a:1", "Metadata": "{\"zone\":\"b\"}"}),
            json!({"Op": 0, "Addr": "a:1", "Metadata": ["x"]}),
            json!({"Op": 0, "Addr": "a:1"}),
        ] {
            assert!(serde_json::from_value::<EndpointUpdate>(raw.clone()).is_err(), "{raw}");
        }
    }
}
