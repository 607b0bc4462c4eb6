//! Support harness for outrigger's integration tests.
//!
//! The integration tests drive the real `outrigger` binary against real
//! neighbours: an `etcd` process, in-process HTTP upstreams and real hyper
//! clients. This module owns all of that plumbing so the tests themselves
//! read as scenarios:
//!
//! - [`ports`]: free loopback ports, never handed out twice per binary;
//! - [`wait`]: poll-until-true with a deadline (the only sleeping allowed);
//! - [`process`]: a spawned child with a log file, signals and reaping;
//! - [`etcd`]: a throwaway single-node etcd plus `etcdctl` helpers;
//! - [`consul_fixture`]: a Consul HTTP API *fixture* (not Consul): the agent
//!   endpoints outrigger uses, with Consul's documented semantics and fault
//!   controls;
//! - [`sidecar`]: the `outrigger` binary under test and its admin API;
//! - [`metrics`]: summing Prometheus samples by series prefix;
//! - [`upstream`]: a recording HTTP/1.1 + h2c + WebSocket test server;
//! - [`client`]: one-shot requests, pooled, HTTP-proxy-style and h2c
//!   clients, and a WebSocket client;
//! - [`loadgen`]: open-loop load with latency/failure summaries per window;
//! - [`watchdog`]: a sidecar's table and RSS sampled throughout a fault;
//! - [`files`]: atomic and non-atomic file writes (static registry files);
//! - [`recording`]: an upstream that records the exact bytes it received and
//!   moves large bodies with checksums;
//! - [`raw`]: raw HTTP/1 bytes and hand-written HTTP/2 frames;
//! - [`procfs`]: RSS, CPU time and open FDs of a process, and peak sampling;
//! - [`guarded_mesh`]: the hardening suites' static mesh (A plus one sidecar
//!   per peer service, shared `[limits]`);
//! - [`pki`]: test CAs and certificates (good and broken) and a direct
//!   mTLS client for the inbound listener.
//!
//! Every helper that does network I/O or waits is async on tokio; helpers
//! that only touch files or spawn a process are plain functions. Nothing
//! here sleeps for a fixed time except [`wait::POLL_INTERVAL`] between polls
//! (and the delays a test asks an [`Upstream`] to inject).

// The harness is shared by every integration test module; a given test run
// (or a partially written suite) does not use every helper.
#![allow(dead_code)]

pub mod client;
pub mod consul_fixture;
pub mod etcd;
pub mod files;
pub mod guarded_mesh;
pub mod loadgen;
pub mod mesh;
pub mod metrics;
pub mod pki;
pub mod ports;
pub mod process;
pub mod procfs;
pub mod raw;
pub mod recording;
pub mod relay;
pub mod sidecar;
pub mod upstream;
pub mod wait;
pub mod watchdog;

pub use consul_fixture::ConsulFixture;
pub use etcd::Etcd;
pub use files::FileDir;
pub use loadgen::{LoadGen, LoadMode, LoadReport};
pub use ports::free_port;
pub use sidecar::{Sidecar, SidecarPorts};
pub use upstream::{RecordedRequest, Upstream};
pub use wait::{exclusive, shared, wait_until};
