//! Relaying an upgraded connection (WebSocket and other `Upgrade`s).
//!
//! Once both sides have switched protocols the sidecar is a byte pipe:
//! both upgraded halves are joined with `copy_bidirectional`.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// Join the client's and the upstream's upgraded connections in a task.
pub fn splice(client: OnUpgrade, upstream: OnUpgrade, request_id: String) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(request_id, error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(request_id, up, down, "upgraded connection closed"),
            Err(e) => tracing::debug!(request_id, error = %e, "upgraded connection failed"),
        }
    });
}
