//! Self-tests of the [`support`](crate::support) harness, runnable without
//! an outrigger sidecar: the upstream server against the clients, the load
//! generator, etcd control, process control (with a stand-in program and a
//! fake admin API) and the small parsers.

mod etcd;
mod loadgen;
mod misc;
mod sidecar;
mod upstream;
