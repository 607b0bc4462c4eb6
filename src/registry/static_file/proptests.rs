//! Property tests (fuzzing) of the static endpoints file, which is also the
//! persisted routing table: a sidecar restarted during a registry outage
//! routes from what [`render_endpoints`] wrote, so parse ∘ render must be
//! the identity, and no file content may panic the parser.

use proptest::prelude::*;

use super::*;
use crate::registry::record::proptests::valid_record;

/// Valid records as a file can hold them: no `protocols` or `version`
/// (the file format has neither), unique by (service, instance).
fn file_records() -> impl Strategy<Value = Vec<EndpointRecord>> {
    proptest::collection::vec(valid_record(), 0..8).prop_map(|records| {
        let mut seen = std::collections::HashSet::new();
        records
            .into_iter()
            .map(|mut r| {
                r.protocols.clear();
                r.version.clear();
                r
            })
            .filter(|r| seen.insert((r.service.clone(), r.instance.clone())))
            .collect()
    })
}

/// TOML-ish text built from the file's own vocabulary, so the parser's
/// per-field checks see many near-valid files rather than only syntax
/// errors.
fn toml_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("service"),
        Just("address"),
        Just("instance"),
        Just("zone"),
        Just("weight"),
        Just("tls"),
        Just("metadata"),
        Just("bogus"),
    ];
    let value = prop_oneof![
        "\"[a-z0-9:.\\[\\]-]{0,20}\"",
        any::<i64>().prop_map(|n| n.to_string()),
        Just("true".to_string()),
        Just("{ a = \"b\" }".to_string()),
        Just("[1, 2]".to_string()),
        ".{0,10}",
    ];
    let line = prop_oneof![
        3 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => Just("[[endpoints]]".to_string()),
        1 => Just("[endpoints]".to_string()),
        1 => ".{0,20}",
    ];
    proptest::collection::vec(line, 0..24).prop_map(|lines| lines.join("\n"))
}

proptest! {
    /// What we persist is exactly what we read back after a restart.
    #[test]
    fn render_then_parse_is_identity(records in file_records()) {
        let text = render_endpoints(&records);
        let parsed = parse_endpoints(&text);
        prop_assert!(parsed.is_ok(), "{text}\n{parsed:?}");
        prop_assert_eq!(parsed.ok(), Some(records));
    }

    /// Arbitrary text never panics; an error names an entry or the syntax.
    #[test]
    fn arbitrary_text_never_panics(text in ".{0,400}") {
        let _ = parse_endpoints(&text);
    }

    /// Near-valid files never panic; whatever is accepted is usable and
    /// renders back to the same records.
    #[test]
    fn near_valid_files_parse_or_fail_cleanly(text in toml_like()) {
        match parse_endpoints(&text) {
            Ok(records) => {
                for r in &records {
                    prop_assert!(r.check().is_ok());
                }
                let again = parse_endpoints(&render_endpoints(&records));
                prop_assert_eq!(again.ok(), Some(records));
            }
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }
}
