//! outrigger: a small, fast sidecar proxy for microservices.
//!
//! Each service instance runs with an outrigger beside it. The sidecar
//! registers its service (while its health probe passes) in etcd, Consul or
//! a static file; watches its peers there to keep a routing table that it
//! swaps atomically; and relays calls between services with health-aware
//! load balancing, retries and failover.
//!
//! ```text
//!  service A ──HTTP──▶ [A: outbound 15001] ──(mTLS, HTTP/2)──▶ [B: inbound 15006] ──▶ service B
//!                           │ routing table (ArcSwap)            │ health probe
//!                           ▲ watch                              ▼ register (lease / TTL)
//!                         registry ◀─────────────────────────────┘
//! ```
//!
//! # Layout
//! - [`config`]: TOML → validated [`config::Config`]; every invalid field reported at once.
//! - [`registry`]: the [`registry::Registry`] trait, the registry record, and the
//!   `static`, `etcd` and `consul` backends (each of the last two behind its
//!   Cargo feature).
//! - [`discovery`]: applies typed registry updates and publishes the routing
//!   snapshot ([`discovery::Table`]) with `ArcSwap`; persists it for restarts.
//! - [`offload`]: large control-plane jobs (a full registry read, a big table
//!   rebuild, `/routes` and `/metrics`) on a lower-priority thread, off the
//!   request thread.
//! - [`balance`]: per-endpoint state (peak-EWMA, in-flight, ejection), retry
//!   budget, and the pickers (p2c-ewma, round-robin, least-request, random).
//! - [`outbound`]: the outbound and `local_port` listeners' request path: target,
//!   lookup, retries and failover; the HTTP/2 peer connection pool and
//!   dialing (plaintext or mTLS).
//! - [`inbound`]: relaying peer (and ingress) requests to the local service.
//! - [`http`]: the body type, header hygiene, errors → responses (one function),
//!   server setup with limits, byte-level connection guards (first-request
//!   deadline, HTTP/1 request-smuggling check), upgrade splicing.
//! - [`health`]: the local probe and the registration driver.
//! - [`admin`]: `/live`, `/ready`, `/routes`, `/metrics`, `/config`, `/drain`.
//! - [`metrics`]: Prometheus metrics.
//! - [`tls`]: mTLS between sidecars: rustls configs, SPIFFE identities and
//!   verifiers, certificate reload, and the `outrigger certs` development CA.
//! - [`app`]: wiring and the shutdown sequence.
//! - [`routes_cli`]: `outrigger routes`, a readable view of a running sidecar's table.

// Audited exceptions, FFI calls without preconditions, are allowed where
// they are made: `memory` (glibc's `malloc_trim`, `mallopt`) and `offload`
// (`gettid`, `setpriority`).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod health;
pub mod http;
pub mod inbound;
pub mod memory;
pub mod metrics;
pub mod offload;
pub mod outbound;
pub mod registry;
pub mod routes_cli;
pub mod scheduling;
pub mod tls;
