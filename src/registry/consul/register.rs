//! Registration: the service, its TTL check, and keeping both true.
//!
//! The driver in [`crate::health`] calls [`Registrar::register`] on every
//! healthy probe tick and [`Registrar::withdraw`] when the probe fails:
//!
//! - not registered (first tick, after a failure, after the agent forgot
//!   us): `PUT /v1/agent/service/register`, then pass the check at once,
//!   because a new TTL check starts critical;
//! - registered: pass the check again once a third of the TTL has gone by,
//!   so one lost update never lets it expire. A `404` means the agent no
//!   longer knows the check (it restarted without our registration): the
//!   registrar registers again on the spot;
//! - withdraw: fail the check with the reason as its output. The instance
//!   stays registered (so recovery is one check update) but leaves every
//!   `?passing` answer, which is what peers route by.
//!
//! Calls are sequential (one driver), so the state is read and written
//! under a plain mutex that is never held across an `.await`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::time::Instant;
use tracing::{info, warn};

use super::record::{check_id, register_body};
use super::{encode_segment, Agent, ConsulError, ConsulSettings, REQUEST_TIMEOUT};
use crate::registry::EndpointRecord;

/// Output of the check while the local probe passes.
const PASS_OUTPUT: &str = "outrigger: the local service passes its health probe";

/// Output of the check after the local probe failed.
const FAIL_OUTPUT: &str = "outrigger: the local service fails its health probe";

/// Registration state and settings.
pub(super) struct Registrar {
    /// The agent client.
    agent: Arc<Agent>,
    /// Tags to register with.
    tags: Vec<String>,
    /// Check TTL.
    ttl: Duration,
    /// Check `DeregisterCriticalServiceAfter`.
    deregister_critical_after: Duration,
    /// What the agent holds, as far as we know.
    state: Mutex<State>,
}

/// What we believe the agent holds.
#[derive(Debug, Default)]
struct State {
    /// The record registered; `None` when it must be (re-)registered.
    registered: Option<EndpointRecord>,
    /// The instance id last registered, kept for deregistration even after
    /// a failure cleared `registered`.
    instance: Option<String>,
    /// The check's status as last set by us.
    passing: bool,
    /// When the check was last passed.
    passed_at: Option<Instant>,
}

/// Check status values of `PUT /v1/agent/check/update/:check_id`.
#[derive(Debug, Clone, Copy)]
enum Status {
    Passing,
    Critical,
}

// === impl Registrar ===

impl Registrar {
    pub(super) fn new(agent: Arc<Agent>, settings: &ConsulSettings) -> Self {
        Registrar {
            agent,
            tags: settings.tags.clone(),
            ttl: settings.ttl,
            deregister_critical_after: settings.deregister_critical_after,
            state: Mutex::new(State::default()),
        }
    }

    /// Registered with a passing check, as far as we know.
    pub(super) fn is_registered(&self) -> bool {
        let s = self.lock();
        s.registered.is_some() && s.passing
    }

    /// Ensure `me` is registered and its check passing.
    pub(super) async fn register(&self, me: &EndpointRecord) -> Result<(), ConsulError> {
        let (current, due) = {
            let s = self.lock();
            let current = s.registered.as_ref() == Some(me);
            let due = !s.passing || s.passed_at.is_none_or(|t| t.elapsed() >= self.ttl / 3);
            (current, due)
        };
        if current {
            if !due {
                return Ok(());
            }
            match self.update(&me.instance, Status::Passing).await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    warn!(registry = %self.agent.name(), instance = %me.instance, "consul agent lost our registration; registering again");
                    self.lock().registered = None;
                }
                Err(e) => return Err(self.failed(e)),
            }
        }
        self.register_now(me).await.map_err(|e| self.failed(e))
    }

    /// Fail the check (the probe failed); the registration stays.
    pub(super) async fn withdraw(&self) -> Result<(), ConsulError> {
        let instance = {
            let s = self.lock();
            match &s.registered {
                Some(r) => r.instance.clone(),
                // Nothing registered, or unknown state after a failure: the
                // next healthy tick re-registers from scratch anyway, and a
                // check nobody passes goes critical by itself.
                None => return Ok(()),
            }
        };
        match self.update(&instance, Status::Critical).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                // The agent does not know us: nothing routable to withdraw.
                self.lock().registered = None;
                Ok(())
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Deregister (shutdown).
    pub(super) async fn deregister(&self) -> Result<(), ConsulError> {
        let instance = {
            let mut s = self.lock();
            s.registered = None;
            s.passing = false;
            s.instance.clone()
        };
        let Some(instance) = instance else {
            return Ok(());
        };
        let path = format!("/v1/agent/service/deregister/{}", encode_segment(&instance));
        self.agent
            .call(
                "deregister",
                Method::PUT,
                &path,
                None,
                REQUEST_TIMEOUT,
                &[StatusCode::NOT_FOUND],
            )
            .await?;
        Ok(())
    }

    /// Register `me`, then pass its check.
    async fn register_now(&self, me: &EndpointRecord) -> Result<(), ConsulError> {
        let body = register_body(me, &self.tags, self.ttl, self.deregister_critical_after)
            .map_err(|message| ConsulError::Protocol {
                op: "register",
                message,
            })?;
        let body = serde_json::to_vec(&body).map_err(|e| ConsulError::Protocol {
            op: "register",
            message: e.to_string(),
        })?;
        self.agent
            .call(
                "register",
                Method::PUT,
                "/v1/agent/service/register",
                Some(body),
                REQUEST_TIMEOUT,
                &[],
            )
            .await?;
        {
            let mut s = self.lock();
            s.registered = Some(me.clone());
            s.instance = Some(me.instance.to_string());
            s.passing = false;
        }
        info!(registry = %self.agent.name(), service = %me.service, instance = %me.instance, "registered with the consul agent");
        if !self.update(&me.instance, Status::Passing).await? {
            // Registered a moment ago and already unknown: the agent is
            // restarting. Start over on the next tick.
            self.lock().registered = None;
            return Err(ConsulError::Protocol {
                op: "check update",
                message: "the agent forgot the check right after registering it".into(),
            });
        }
        Ok(())
    }

    /// Set our check's status. `Ok(false)` when the agent answers 404 (it
    /// does not know the check).
    async fn update(&self, instance: &str, status: Status) -> Result<bool, ConsulError> {
        let (status_str, output) = match status {
            Status::Passing => ("passing", PASS_OUTPUT),
            Status::Critical => ("critical", FAIL_OUTPUT),
        };
        let path = format!(
            "/v1/agent/check/update/{}",
            encode_segment(&check_id(instance))
        );
        let body = serde_json::json!({ "Status": status_str, "Output": output }).to_string();
        let answer = self
            .agent
            .call(
                "check_update",
                Method::PUT,
                &path,
                Some(body.into_bytes()),
                REQUEST_TIMEOUT,
                &[StatusCode::NOT_FOUND],
            )
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        let mut s = self.lock();
        match status {
            Status::Passing => {
                s.passing = true;
                s.passed_at = Some(Instant::now());
            }
            Status::Critical => s.passing = false,
        }
        Ok(true)
    }

    /// After a failed call the agent's state is unknown (it may have
    /// restarted): forget it, so the next healthy tick registers again.
    fn failed(&self, e: ConsulError) -> ConsulError {
        let mut s = self.lock();
        s.registered = None;
        s.passing = false;
        e
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is always valid, even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
