//! Load balancing: per-endpoint state that outlives table swaps, the
//! peak-EWMA estimator, passive outlier ejection, the retry budget, and the
//! pickers (p2c-ewma, round-robin, least-request, random).

mod budget;
mod endpoint;
mod ewma;
mod pick;

#[cfg(test)]
mod tests;

pub use budget::RetryBudget;
pub use endpoint::{EndpointState, EndpointStats, Failure, LoadGuard};
pub use ewma::{PeakEwma, DEFAULT_RTT};
pub use pick::{may_eject, pick, Pick, PickError};
