//! outrigger integration tests: the real binary against real etcd, real
//! upstream servers and real clients. The shared harness is in [`support`];
//! `support_selftest` checks the harness itself without needing a sidecar.

mod etcd_backend;
mod etcd_sidecar;
mod failover;
mod foundation;
mod mtls;
mod support;
mod support_selftest;
