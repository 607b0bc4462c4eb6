//! Property tests (fuzzing) of the config parser and validator.
//!
//! The config comes from files and environment variables that operators
//! (and their tooling) write; a typo must produce a clear error naming the
//! field, never a panic. Valid configs must mean exactly what they say:
//! every generated value reads back unchanged, whether it came from the
//! file or from an `OUTRIGGER_<SECTION>__<KEY>` override. proptest's default
//! of 256 cases keeps CI quick; `scripts/fuzz.sh` raises `PROPTEST_CASES`.

use std::time::Duration;

use proptest::prelude::*;

use super::duration::{format_size, parse_size};
use super::*;

/// The minimal valid file the generated overrides are layered on.
const BASE: &str = r#"
[service]
name = "b"
address = "127.0.0.1:8080"
instance_id = "b-1"
[registry]
kind = "static"
file = "endpoints.toml"
"#;

/// Keys the validator knows, so generated trees reach its field checks.
const KEYS: &[&str] = &[
    "name",
    "instance_id",
    "address",
    "advertise",
    "zone",
    "weight",
    "tags",
    "metadata",
    "health",
    "http",
    "tcp",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "outbound",
    "inbound",
    "admin",
    "ingress",
    "worker_threads",
    "drain_timeout",
    "state_dir",
    "kind",
    "endpoints",
    "prefix",
    "ttl",
    "file",
    "poll_interval",
    "username",
    "password",
    "mesh_domain",
    "lb",
    "connect_timeout",
    "per_try_timeout",
    "idle_timeout",
    "retries",
    "retry_budget_percent",
    "retry_budget_min_per_sec",
    "max_requests",
    "max_requests_per_endpoint",
    "panic_threshold_percent",
    "outlier",
    "consecutive_failures",
    "base_ejection",
    "max_ejection",
    "local_port",
    "max_header_bytes",
    "max_headers",
    "header_read_timeout",
    "max_connections",
    "max_concurrent_streams",
    "ca",
    "cert",
    "key",
    "trust_domain",
    "allow",
    "bogus",
];

/// Top-level sections (and a wrong one).
const SECTIONS: &[&str] = &[
    "service",
    "listeners",
    "runtime",
    "registry",
    "outbound",
    "upstreams",
    "limits",
    "tls",
    "nope",
];

/// A TOML value of any type, with strings that look like what the
/// validator parses (durations, sizes, addresses, kinds).
fn toml_value() -> BoxedStrategy<toml::Value> {
    use toml::Value;
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::Integer),
        (-5i64..70_000).prop_map(Value::Integer),
        any::<f64>().prop_map(Value::Float),
        any::<bool>().prop_map(Value::Boolean),
        ".{0,16}".prop_map(Value::String),
        "[0-9]{1,4}(ns|us|ms|s|m|h|x)?".prop_map(Value::String),
        "[0-9]{1,6}(B|KiB|MiB|GiB|kb)?".prop_map(Value::String),
        "(127\\.0\\.0\\.1|0\\.0\\.0\\.0|h|\\[::1\\]):[0-9]{1,6}".prop_map(Value::String),
        "(etcd|static|consul|p2c-ewma|round-robin|random|/healthz|http://h:2379)"
            .prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            proptest::collection::btree_map(proptest::sample::select(KEYS), inner, 0..8).prop_map(
                |m| {
                    toml::Value::Table(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                }
            ),
        ]
    })
    .boxed()
}

/// A whole config tree: known sections holding known keys.
fn toml_tree() -> impl Strategy<Value = toml::Table> {
    let section =
        proptest::collection::btree_map(proptest::sample::select(KEYS), toml_value(), 0..10);
    let body = prop_oneof![
        3 => section.clone().prop_map(|m| toml::Value::Table(
            m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
        )),
        1 => proptest::collection::vec(section, 0..3).prop_map(|v| toml::Value::Array(
            v.into_iter()
                .map(|m| toml::Value::Table(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
                .collect()
        )),
        1 => toml_value(),
    ];
    proptest::collection::btree_map(proptest::sample::select(SECTIONS), body, 0..8)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// A duration in the range configs use, at millisecond precision.
fn duration() -> impl Strategy<Value = Duration> {
    (1u64..10_000_000).prop_map(Duration::from_millis)
}

/// Everything a valid generated config sets, to compare after loading.
#[derive(Debug, Clone)]
struct Valid {
    name: String,
    instance: String,
    port: u16,
    zone: Option<String>,
    weight: u32,
    interval: Duration,
    ttl: Duration,
    lb: (&'static str, LbKind),
    timeout: Duration,
    retries: u32,
    budget: u32,
    max_header_bytes: u64,
    upstream: Option<(String, u16, u32)>,
    base_ejection: Duration,
    extra_ejection: Duration,
}

fn valid() -> impl Strategy<Value = Valid> {
    let lb = proptest::sample::select(vec![
        ("p2c-ewma", LbKind::P2cEwma),
        ("round-robin", LbKind::RoundRobin),
        ("least-request", LbKind::LeastRequest),
        ("random", LbKind::Random),
    ]);
    (
        (
            // Not starting with `u`: upstream names below start `up-`.
            "[a-t]([a-z0-9-]{0,10}[a-z0-9])?",
            "[a-z0-9][a-z0-9._-]{0,20}",
            // Below the default listener ports (15000-15006).
            1u16..15_000,
            proptest::option::of("[a-z0-9-]{1,8}"),
            1u32..=10_000,
            // At least the default probe timeout (500 ms).
            (1_000u64..10_000_000).prop_map(Duration::from_millis),
            (1u64..600).prop_map(Duration::from_secs),
        ),
        (
            lb,
            duration(),
            0u32..=10,
            0u32..=100,
            (1u64 << 10)..(1 << 20),
            proptest::option::of(("up-[a-z0-9]{1,8}", 20_000u16..30_000, 0u32..=10)),
            duration(),
            duration(),
        ),
    )
        .prop_map(
            |(
                (name, instance, port, zone, weight, interval, ttl),
                (lb, timeout, retries, budget, max_header_bytes, upstream, base, extra),
            )| Valid {
                name,
                instance,
                port,
                zone,
                weight,
                interval,
                ttl,
                lb,
                timeout,
                retries,
                budget,
                max_header_bytes,
                upstream,
                base_ejection: base,
                extra_ejection: extra,
            },
        )
}

impl Valid {
    /// The config file for these values.
    fn toml(&self) -> String {
        let zone = match &self.zone {
            Some(z) => format!("zone = \"{z}\"\n"),
            None => String::new(),
        };
        let upstream = match &self.upstream {
            Some((name, port, retries)) => format!(
                "[[upstreams]]\nname = \"{name}\"\nlocal_port = {port}\nretries = {retries}\n"
            ),
            None => String::new(),
        };
        format!(
            r#"[service]
name = "{name}"
instance_id = "{instance}"
address = "127.0.0.1:{port}"
{zone}weight = {weight}
[service.health]
interval = "{interval}"
[registry]
kind = "etcd"
endpoints = ["http://127.0.0.1:2379"]
ttl = "{ttl}"
[outbound]
lb = "{lb}"
timeout = "{timeout}"
retries = {retries}
retry_budget_percent = {budget}
[outbound.outlier]
base_ejection = "{base}"
max_ejection = "{max}"
[limits]
max_header_bytes = "{size}"
{upstream}"#,
            name = self.name,
            instance = self.instance,
            port = self.port,
            weight = self.weight,
            interval = format_duration(self.interval),
            ttl = format_duration(self.ttl),
            lb = self.lb.0,
            timeout = format_duration(self.timeout),
            retries = self.retries,
            budget = self.budget,
            base = format_duration(self.base_ejection),
            max = format_duration(self.base_ejection + self.extra_ejection),
            size = format_size(self.max_header_bytes),
        )
    }

    /// Whether `c` holds exactly these values.
    fn check(&self, c: &Config) -> Result<(), TestCaseError> {
        prop_assert_eq!(&c.service.name, &self.name);
        prop_assert_eq!(&c.service.instance_id, &self.instance);
        prop_assert_eq!(&c.service.address, &format!("127.0.0.1:{}", self.port));
        prop_assert_eq!(&c.service.zone, &self.zone);
        prop_assert_eq!(c.service.weight, self.weight);
        prop_assert_eq!(c.service.health.interval, self.interval);
        prop_assert_eq!(c.registries.len(), 1);
        prop_assert_eq!(c.registries[0].ttl, self.ttl);
        let d = &c.outbound.defaults;
        prop_assert_eq!(d.lb, self.lb.1);
        prop_assert_eq!(d.timeout, self.timeout);
        prop_assert_eq!(d.retries, self.retries);
        prop_assert_eq!(d.retry_budget_percent, self.budget);
        prop_assert_eq!(d.outlier.base_ejection, self.base_ejection);
        prop_assert_eq!(
            d.outlier.max_ejection,
            self.base_ejection + self.extra_ejection
        );
        prop_assert_eq!(c.limits.max_header_bytes as u64, self.max_header_bytes);
        match &self.upstream {
            Some((name, port, retries)) => {
                prop_assert_eq!(c.upstreams.len(), 1);
                prop_assert_eq!(&c.upstreams[0].name, name);
                prop_assert_eq!(c.upstreams[0].local_port, Some(*port));
                prop_assert_eq!(c.upstreams[0].policy.retries, *retries);
                // Unset keys inherit [outbound].
                prop_assert_eq!(c.upstreams[0].policy.lb, self.lb.1);
                prop_assert_eq!(c.upstreams[0].policy.timeout, self.timeout);
            }
            None => prop_assert!(c.upstreams.is_empty()),
        }
        Ok(())
    }
}

/// Every reported problem names a field and says what is wrong.
fn check_error(e: &ConfigError) -> Result<(), TestCaseError> {
    match e {
        ConfigError::Invalid(problems) => {
            prop_assert!(!problems.is_empty());
            for p in problems {
                prop_assert!(!p.path.is_empty(), "a problem without a field: {p:?}");
                prop_assert!(!p.message.is_empty(), "a problem without a reason: {p:?}");
            }
        }
        ConfigError::Syntax { message } => prop_assert!(!message.is_empty()),
        ConfigError::Read { .. } => prop_assert!(false, "nothing was read from disk"),
    }
    Ok(())
}

proptest! {
    /// Arbitrary text never panics the loader.
    #[test]
    fn arbitrary_text_never_panics(text in ".{0,300}") {
        if let Err(e) = Config::from_str_with_env(&text, []) {
            check_error(&e)?;
        }
    }

    /// Arbitrary TOML trees of known sections and keys never panic, and
    /// every rejection names its fields.
    #[test]
    fn arbitrary_trees_are_validated_or_rejected_with_fields(tree in toml_tree()) {
        let text = toml::to_string(&tree).unwrap_or_default();
        if let Err(e) = Config::from_str_with_env(&text, []) {
            check_error(&e)?;
        }
    }

    /// Arbitrary environment overrides never panic; a bad one is reported
    /// under the variable's name.
    #[test]
    fn arbitrary_overrides_never_panic(
        vars in proptest::collection::vec(
            (
                "OUTRIGGER_(SERVICE|LISTENERS|REGISTRY|OUTBOUND|LIMITS|X)__[A-Z_]{0,12}(__[A-Z_]{0,8})?",
                ".{0,24}",
            ),
            0..6,
        )
    ) {
        if let Err(e) = Config::from_str_with_env(BASE, vars) {
            check_error(&e)?;
        }
    }

    /// A valid generated config loads, and means exactly what it says.
    #[test]
    fn valid_configs_round_trip(v in valid()) {
        let text = v.toml();
        match Config::from_str_with_env(&text, []) {
            Ok(config) => v.check(&config)?,
            Err(e) => prop_assert!(false, "{text}\nrejected: {e}"),
        }
    }

    /// The same values given as environment overrides load the same way.
    #[test]
    fn overrides_mean_what_the_file_means(v in valid()) {
        let env = vec![
            ("OUTRIGGER_SERVICE__NAME".to_string(), v.name.clone()),
            ("OUTRIGGER_SERVICE__INSTANCE_ID".to_string(), v.instance.clone()),
            ("OUTRIGGER_SERVICE__WEIGHT".to_string(), v.weight.to_string()),
            ("OUTRIGGER_OUTBOUND__TIMEOUT".to_string(), format_duration(v.timeout)),
            ("OUTRIGGER_OUTBOUND__RETRIES".to_string(), v.retries.to_string()),
        ];
        match Config::from_str_with_env(BASE, env) {
            Ok(c) => {
                prop_assert_eq!(&c.service.name, &v.name);
                prop_assert_eq!(&c.service.instance_id, &v.instance);
                prop_assert_eq!(c.service.weight, v.weight);
                prop_assert_eq!(c.outbound.defaults.timeout, v.timeout);
                prop_assert_eq!(c.outbound.defaults.retries, v.retries);
            }
            Err(e) => prop_assert!(false, "rejected: {e}"),
        }
    }

    /// Durations and sizes print in a syntax that parses back exactly
    /// (`/config` and error messages show values this way).
    #[test]
    fn durations_and_sizes_round_trip(nanos in any::<u64>(), bytes in any::<u64>(), text in ".{0,16}") {
        let d = Duration::from_nanos(nanos);
        prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        prop_assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        let _ = parse_duration(&text);
        let _ = parse_size(&text);
    }
}
