//! `OUTRIGGER_<SECTION>__<KEY>` environment overrides.
//!
//! Overrides are applied to the raw TOML tree *before* validation, so an
//! overridden value is checked exactly like one written in the file. The
//! `__` separator is required because single underscores occur inside key
//! names (`instance_id`), and it keeps unrelated variables such as
//! `OUTRIGGER_IMAGE` (deployment tooling) out of the config.

use toml::{Table, Value};

use super::validate::{ConfigError, FieldError};

const PREFIX: &str = "OUTRIGGER_";

/// Apply every `OUTRIGGER_A__B__C=value` in `env` to `table` (setting
/// `a.b.c`). All bad overrides are reported together, each naming its
/// variable.
pub(crate) fn apply_overrides(
    table: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| {
            name.strip_prefix(PREFIX)
                .is_some_and(|rest| rest.contains("__"))
        })
        .collect();
    // The environment has no order; sorting makes a parent-and-child pair
    // (`..__HEALTH` and `..__HEALTH__HTTP`) apply the same way every time.
    vars.sort();

    let mut problems = Vec::new();
    for (name, raw) in vars {
        if let Err(message) = apply_one(table, &name, &raw) {
            problems.push(FieldError {
                path: name,
                message,
            });
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

fn apply_one(table: &mut Table, name: &str, raw: &str) -> Result<(), String> {
    let rest = name.strip_prefix(PREFIX).unwrap_or(name);
    let segments: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
    if segments.iter().any(String::is_empty) {
        return Err("empty path segment (use OUTRIGGER_SECTION__KEY)".to_owned());
    }
    let value = match segments.last() {
        // A string field takes the text as it is: `INSTANCE_ID=0` or
        // `ZONE=true` are a name, not a number or a boolean (found by the
        // property tests). Quoting still works for the other fields.
        Some(key) if STRING_KEYS.contains(&key.as_str()) && !is_quoted(raw) => {
            Value::String(raw.to_owned())
        }
        _ => parse_value(raw),
    };
    let walk = Walk {
        segments: &segments,
        value,
    };
    walk.set_in_table(table, 0)
}

/// Config keys whose value is always a string, whatever it looks like.
const STRING_KEYS: &[&str] = &[
    "name",
    "instance_id",
    "address",
    "advertise",
    "zone",
    "http",
    "kind",
    "prefix",
    "file",
    "username",
    "password",
    "token",
    "datacenter",
    "mesh_domain",
    "lb",
    "state_dir",
    "ca",
    "cert",
    "key",
    "trust_domain",
];

/// `"text"` or `'text'`: an explicitly quoted TOML string.
fn is_quoted(raw: &str) -> bool {
    let t = raw.trim();
    t.len() >= 2
        && ((t.starts_with('"') && t.ends_with('"')) || (t.starts_with('\'') && t.ends_with('\'')))
}

/// The value as TOML if it parses (`5`, `true`, `["a"]`, `"quoted"`), else
/// the raw text as a string (so `OUTRIGGER_SERVICE__NAME=b` needs no quotes).
fn parse_value(raw: &str) -> Value {
    use serde::Deserialize as _;
    match Value::deserialize(toml::de::ValueDeserializer::new(raw)) {
        // No config field is a date, and `2024-01-01` as an instance id or
        // zone is more plausible than as a TOML datetime.
        Ok(Value::Datetime(_)) | Err(_) => Value::String(raw.to_owned()),
        Ok(value) => value,
    }
}

/// One override being applied: the lowercased path and its value.
struct Walk<'a> {
    segments: &'a [String],
    value: Value,
}

impl Walk<'_> {
    /// The dotted config path of `segments[..end]`, e.g. `registry[1].kind`.
    fn path(&self, end: usize) -> String {
        let mut out = String::new();
        for segment in &self.segments[..end] {
            if segment.bytes().all(|b| b.is_ascii_digit()) && !out.is_empty() {
                out.push_str(&format!("[{segment}]"));
            } else {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(segment);
            }
        }
        out
    }

    /// Set `segments[at..]` inside `table`.
    fn set_in_table(self, table: &mut Table, at: usize) -> Result<(), String> {
        let key = &self.segments[at];
        if at + 1 == self.segments.len() {
            table.insert(key.clone(), self.value);
            return Ok(());
        }
        let next_is_index = is_index(&self.segments[at + 1]);
        let child = match table.get_mut(key.as_str()) {
            Some(child) => child,
            None if next_is_index => {
                return Err(format!(
                    "{} is not in the file, so it has no entry to override \
                     (overrides change entries, they cannot add them)",
                    self.path(at + 1)
                ))
            }
            None => table
                .entry(key.clone())
                .or_insert_with(|| Value::Table(Table::new())),
        };
        match child {
            Value::Table(inner) => self.set_in_table(inner, at + 1),
            Value::Array(items) => self.set_in_array(items, at + 1),
            other => Err(format!(
                "{} is {}, not a table",
                self.path(at + 1),
                a_type(other)
            )),
        }
    }

    /// Set `segments[at..]` inside the array at `segments[at - 1]`: a
    /// numeric segment picks an element; otherwise an array of exactly one
    /// table (`[[registry]]` with one entry) is unambiguous.
    fn set_in_array(self, items: &mut [Value], at: usize) -> Result<(), String> {
        let array_path = self.path(at);
        let segment = &self.segments[at];
        let (index, next) = if is_index(segment) {
            let index = segment
                .parse::<usize>()
                .ok()
                .filter(|i| *i < items.len())
                .ok_or_else(|| {
                    format!(
                        "{array_path} has {} entries; index {segment} is out of range",
                        items.len()
                    )
                })?;
            (index, at + 1)
        } else if items.len() == 1 {
            (0, at)
        } else {
            return Err(format!(
                "{array_path} has {} entries; say which one, e.g. {}",
                items.len(),
                self.indexed_example(at)
            ));
        };
        if next == self.segments.len() {
            items[index] = self.value;
            return Ok(());
        }
        match &mut items[index] {
            Value::Table(inner) => self.set_in_table(inner, next),
            other => Err(format!(
                "{array_path}[{index}] is {}, not a table",
                a_type(other)
            )),
        }
    }

    /// The variable name with an index inserted before `segments[at]`.
    fn indexed_example(&self, at: usize) -> String {
        let upper = |s: &[String]| s.join("__").to_uppercase();
        format!(
            "{PREFIX}{}__0__{}",
            upper(&self.segments[..at]),
            upper(&self.segments[at..])
        )
    }
}

/// `a string`, `an integer`, ... for messages.
fn a_type(value: &Value) -> String {
    let name = value.type_str();
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {name}")
}

fn is_index(segment: &str) -> bool {
    !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        match text.parse() {
            Ok(t) => t,
            Err(e) => panic!("test TOML does not parse: {e}"),
        }
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn apply(text: &str, pairs: &[(&str, &str)]) -> Result<Table, Vec<FieldError>> {
        let mut t = table(text);
        match apply_overrides(&mut t, vars(pairs)) {
            Ok(()) => Ok(t),
            Err(ConfigError::Invalid(problems)) => Err(problems),
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn sets_nested_keys_and_creates_tables() {
        let t = apply(
            "[service]\nname = \"a\"\n",
            &[
                ("OUTRIGGER_SERVICE__NAME", "b"),
                ("OUTRIGGER_SERVICE__HEALTH__HTTP", "/hz"),
                ("OUTRIGGER_LISTENERS__ADMIN", "127.0.0.1:9000"),
            ],
        )
        .unwrap();
        assert_eq!(t["service"]["name"].as_str(), Some("b"));
        assert_eq!(t["service"]["health"]["http"].as_str(), Some("/hz"));
        assert_eq!(t["listeners"]["admin"].as_str(), Some("127.0.0.1:9000"));
    }

    #[test]
    fn values_are_toml_when_they_parse() {
        let t = apply(
            "",
            &[
                ("OUTRIGGER_SERVICE__WEIGHT", "5"),
                ("OUTRIGGER_SERVICE__HEALTH__TCP", "true"),
                ("OUTRIGGER_SERVICE__TAGS", r#"["a","b"]"#),
                ("OUTRIGGER_SERVICE__ZONE", r#""quoted""#),
                ("OUTRIGGER_SERVICE__ADDRESS", "app:8080"),
                ("OUTRIGGER_SERVICE__INSTANCE_ID", "2024-01-01"),
                ("OUTRIGGER_OUTBOUND__TIMEOUT", "2s"),
                ("OUTRIGGER_SERVICE__METADATA", "{ team = \"x\" }"),
            ],
        )
        .unwrap();
        let service = &t["service"];
        assert_eq!(service["weight"].as_integer(), Some(5));
        assert_eq!(service["health"]["tcp"].as_bool(), Some(true));
        assert_eq!(service["tags"], Value::Array(vec!["a".into(), "b".into()]));
        assert_eq!(service["zone"].as_str(), Some("quoted"));
        assert_eq!(service["address"].as_str(), Some("app:8080"));
        assert_eq!(service["instance_id"].as_str(), Some("2024-01-01"));
        assert_eq!(service["metadata"]["team"].as_str(), Some("x"));
        assert_eq!(t["outbound"]["timeout"].as_str(), Some("2s"));
    }

    #[test]
    fn ignores_variables_without_double_underscore_or_prefix() {
        let t = apply(
            "[service]\nname = \"a\"\n",
            &[
                ("OUTRIGGER_IMAGE", "outrigger:latest"),
                ("OUTRIGGER_SERVICE_NAME", "nope"),
                ("SERVICE__NAME", "nope"),
                ("outrigger_service__name", "nope"),
                ("PATH", "/bin"),
            ],
        )
        .unwrap();
        assert_eq!(t, table("[service]\nname = \"a\"\n"));
    }

    const TWO_REGISTRIES: &str = r#"
        [[registry]]
        kind = "etcd"
        endpoints = ["http://a:2379", "http://b:2379"]
        [[registry]]
        kind = "consul"
    "#;

    #[test]
    fn numeric_segment_indexes_arrays() {
        let t = apply(
            TWO_REGISTRIES,
            &[
                ("OUTRIGGER_REGISTRY__1__TOKEN", "secret"),
                ("OUTRIGGER_REGISTRY__0__ENDPOINTS__1", "http://c:2379"),
            ],
        )
        .unwrap();
        let registries = t["registry"].as_array().unwrap();
        assert_eq!(registries[1]["token"].as_str(), Some("secret"));
        assert_eq!(registries[1]["kind"].as_str(), Some("consul"));
        assert_eq!(
            registries[0]["endpoints"],
            Value::Array(vec!["http://a:2379".into(), "http://c:2379".into()])
        );
        assert!(registries[0].get("token").is_none());
    }

    #[test]
    fn single_element_array_needs_no_index() {
        let t = apply(
            "[[registry]]\nkind = \"etcd\"\n",
            &[("OUTRIGGER_REGISTRY__PREFIX", "/mesh")],
        )
        .unwrap();
        assert_eq!(t["registry"][0]["prefix"].as_str(), Some("/mesh"));
    }

    #[test]
    fn plain_registry_table_is_a_table() {
        let t = apply(
            "[registry]\nkind = \"etcd\"\n",
            &[("OUTRIGGER_REGISTRY__KIND", "consul")],
        )
        .unwrap();
        assert_eq!(t["registry"]["kind"].as_str(), Some("consul"));
    }

    #[test]
    fn ambiguous_and_out_of_range_indexes_are_errors() {
        let problems = apply(
            TWO_REGISTRIES,
            &[
                ("OUTRIGGER_REGISTRY__KIND", "static"),
                ("OUTRIGGER_REGISTRY__2__KIND", "static"),
            ],
        )
        .unwrap_err();
        assert_eq!(
            problems,
            vec![
                FieldError {
                    path: "OUTRIGGER_REGISTRY__2__KIND".into(),
                    message: "registry has 2 entries; index 2 is out of range".into(),
                },
                FieldError {
                    path: "OUTRIGGER_REGISTRY__KIND".into(),
                    message: "registry has 2 entries; say which one, e.g. \
                              OUTRIGGER_REGISTRY__0__KIND"
                        .into(),
                },
            ]
        );
    }

    #[test]
    fn structural_conflicts_are_errors() {
        let problems = apply(
            "[service]\nname = \"a\"\n",
            &[
                ("OUTRIGGER_SERVICE__NAME__FIRST", "x"),
                ("OUTRIGGER_UPSTREAMS__0__NAME", "c"),
                ("OUTRIGGER_SERVICE____NAME", "x"),
                ("OUTRIGGER_SERVICE__", "x"),
            ],
        )
        .unwrap_err();
        let got: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.path.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "OUTRIGGER_SERVICE__",
                    "empty path segment (use OUTRIGGER_SECTION__KEY)"
                ),
                (
                    "OUTRIGGER_SERVICE__NAME__FIRST",
                    "service.name is a string, not a table"
                ),
                (
                    "OUTRIGGER_SERVICE____NAME",
                    "empty path segment (use OUTRIGGER_SECTION__KEY)"
                ),
                (
                    "OUTRIGGER_UPSTREAMS__0__NAME",
                    "upstreams is not in the file, so it has no entry to override \
                     (overrides change entries, they cannot add them)"
                ),
            ]
        );
    }

    #[test]
    fn overrides_flow_into_validation() {
        let text = r#"
            [service]
            name = "b"
            address = "127.0.0.1:8080"
            instance_id = "b-1"
            [[registry]]
            kind = "etcd"
            [[upstreams]]
            name = "c"
            [[upstreams]]
            name = "d"
        "#;
        let config = crate::config::Config::from_str_with_env(
            text,
            vars(&[
                ("OUTRIGGER_SERVICE__WEIGHT", "7"),
                ("OUTRIGGER_UPSTREAMS__1__RETRIES", "4"),
                ("OUTRIGGER_REGISTRY__TTL", "9s"),
            ]),
        )
        .unwrap();
        assert_eq!(config.service.weight, 7);
        assert_eq!(config.upstreams[0].policy.retries, 2);
        assert_eq!(config.upstreams[1].policy.retries, 4);
        assert_eq!(config.registries[0].ttl, std::time::Duration::from_secs(9));

        // A bad override is reported by variable name and stops the load.
        let err = crate::config::Config::from_str_with_env(
            text,
            vars(&[("OUTRIGGER_UPSTREAMS__RETRIES", "4")]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid config: 1 problem\nOUTRIGGER_UPSTREAMS__RETRIES: upstreams has 2 \
             entries; say which one, e.g. OUTRIGGER_UPSTREAMS__0__RETRIES"
        );
    }
}
