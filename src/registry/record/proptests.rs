//! Property tests (fuzzing) of the registry value decoder.
//!
//! Every sidecar decodes whatever any writer put under the mesh prefix, so
//! the decoder sees hostile input: it must never panic, must reject what
//! the data path cannot use, and must round-trip what it accepts. The case
//! count is proptest's default (256) so CI stays quick; `scripts/fuzz.sh`
//! runs the same properties with `PROPTEST_CASES` raised for a long pass.

use proptest::prelude::*;

use super::*;

/// A valid service name (DNS label).
fn service_name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
}

/// A valid instance id.
fn instance_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,40}"
}

/// A valid `host:port`.
fn address() -> impl Strategy<Value = String> {
    let host = prop_oneof![
        "[a-z0-9][a-z0-9.-]{0,30}",
        any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
        any::<std::net::Ipv6Addr>().prop_map(|ip| format!("[{ip}]")),
    ];
    (host, 1u16..).prop_map(|(h, p)| format!("{h}:{p}"))
}

/// A record that passes [`EndpointRecord::check`].
pub(crate) fn valid_record() -> impl Strategy<Value = EndpointRecord> {
    (
        service_name(),
        instance_id(),
        address(),
        proptest::option::of("[a-z0-9-]{1,10}"),
        1..=MAX_WEIGHT,
        proptest::collection::vec("h1|h2|http1|grpc", 0..3),
        any::<bool>(),
        proptest::collection::btree_map(".{0,8}", ".{0,16}", 0..4),
        ".{0,12}",
    )
        .prop_map(
            |(service, instance, address, zone, weight, protocols, tls, metadata, version)| {
                EndpointRecord {
                    service: service.into(),
                    instance: instance.into(),
                    address: address.into(),
                    zone: zone.map(Into::into),
                    weight,
                    protocols: protocols.into_iter().map(Into::into).collect(),
                    tls,
                    metadata,
                    version: version.into(),
                }
            },
        )
}

/// Arbitrary JSON, biased towards the fields a record has, so the decoder's
/// field checks are exercised and not only its JSON syntax errors.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
        address().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        let key = prop_oneof![
            Just("service".to_string()),
            Just("instance".to_string()),
            Just("address".to_string()),
            Just("zone".to_string()),
            Just("weight".to_string()),
            Just("protocols".to_string()),
            Just("tls".to_string()),
            Just("metadata".to_string()),
            Just("version".to_string()),
            ".{0,6}",
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(key, inner, 0..9)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = EndpointRecord::decode(&bytes);
    }

    /// Arbitrary JSON never panics, and whatever is accepted is a record
    /// the data path can use and that re-encodes to itself.
    #[test]
    fn arbitrary_json_is_decoded_or_rejected(value in json_value()) {
        let text = value.to_string();
        if let Ok(record) = EndpointRecord::decode(text.as_bytes()) {
            prop_assert!(record.check().is_ok());
            prop_assert!(is_service_name(&record.service));
            prop_assert!(check_host_port(&record.address).is_ok());
            prop_assert!((1..=MAX_WEIGHT).contains(&record.weight));
            let again = EndpointRecord::decode(record.encode().as_bytes());
            prop_assert_eq!(again.ok(), Some(record));
        }
    }

    /// A valid record survives encode → decode exactly.
    #[test]
    fn valid_records_round_trip(record in valid_record()) {
        let encoded = record.encode();
        let decoded = EndpointRecord::decode(encoded.as_bytes());
        prop_assert!(decoded.is_ok(), "{encoded}: {decoded:?}");
        prop_assert_eq!(decoded.ok(), Some(record));
    }

    /// A valid record with one byte flipped is decoded or rejected, never a
    /// panic; and the size limit holds whatever the content.
    #[test]
    fn mutated_records_never_panic(
        record in valid_record(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        pad in 0usize..2048,
    ) {
        let mut bytes = record.encode().into_bytes();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let _ = EndpointRecord::decode(&bytes);
        let mut big = vec![b' '; MAX_RECORD_BYTES - pad.min(MAX_RECORD_BYTES)];
        big.extend_from_slice(record.encode().as_bytes());
        if big.len() > MAX_RECORD_BYTES {
            prop_assert!(matches!(EndpointRecord::decode(&big), Err(DecodeError::TooLarge(_))));
        }
    }

    /// `host:port` checking never panics on arbitrary text.
    #[test]
    fn host_port_never_panics(s in ".{0,64}") {
        let _ = check_host_port(&s);
        let _ = is_service_name(&s);
        let _ = is_instance_id(&s);
    }
}
