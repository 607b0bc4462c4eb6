//! outrigger integration tests: the real binary against real etcd, real
//! upstream servers and real clients. The shared harness is in [`support`];
//! `support_selftest` checks the harness itself without needing a sidecar.

mod consul;
mod etcd_backend;
mod etcd_sidecar;
mod failover;
mod foundation;
mod hardening_h2;
mod hardening_input;
mod hardening_overload;
mod mtls;
mod registry_faults;
mod scheduling;
mod soak;
mod support;
mod support_selftest;
