//! Which service a request from the local service names.
//!
//! `HTTP_PROXY` clients send the absolute form (`GET http://b/path`); others
//! send `Host: b`, `b:80` or `b.<mesh_domain>`; HTTP/2 clients send
//! `:authority`. All name service `b`.

use std::borrow::Cow;
use std::sync::Arc;

use http::Request;

use crate::discovery::{ServiceRoutes, Table};
use crate::http::ProxyError;
use crate::registry::is_service_name;

/// Extract the target service name.
pub fn target_service<B>(req: &Request<B>, mesh_domain: &str) -> Result<String, ProxyError> {
    Ok(target_name(req, mesh_domain)?.into_owned())
}

/// Find the routes of the service a request names: the target step and the
/// lookup step of the request path, in one call so that neither allocates
/// (the name is borrowed from the request unless it had to be lowercased).
pub fn lookup<'t, B>(
    table: &'t Table,
    req: &Request<B>,
    mesh_domain: &str,
) -> Result<&'t Arc<ServiceRoutes>, ProxyError> {
    let name = target_name(req, mesh_domain)?;
    table
        .get(&name)
        .ok_or_else(|| ProxyError::UnknownService(name.into_owned()))
}

/// The service name, borrowed from the request where possible.
fn target_name<'r, B>(req: &'r Request<B>, mesh_domain: &str) -> Result<Cow<'r, str>, ProxyError> {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or(ProxyError::NoTarget)?,
    };
    name_from_authority(authority, mesh_domain)
}

/// `b`, `b:80`, `b.mesh`, `B.Mesh.` → `b`.
pub fn service_from_authority(authority: &str, mesh_domain: &str) -> Result<String, ProxyError> {
    Ok(name_from_authority(authority, mesh_domain)?.into_owned())
}

/// [`service_from_authority`] without the copy: it runs for every request,
/// and nearly every client already sends the name in lowercase.
fn name_from_authority<'a>(
    authority: &'a str,
    mesh_domain: &str,
) -> Result<Cow<'a, str>, ProxyError> {
    // Drop userinfo and port; a service name never contains ':' or '@'.
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let mut name = host;
    let suffix_len = mesh_domain.len() + 1;
    if !mesh_domain.is_empty()
        && name.len() > suffix_len
        && name.is_char_boundary(name.len() - suffix_len)
        && name[name.len() - mesh_domain.len()..].eq_ignore_ascii_case(mesh_domain)
        && name.as_bytes()[name.len() - suffix_len] == b'.'
    {
        name = &name[..name.len() - suffix_len];
    }
    let name: Cow<'a, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    };
    if is_service_name(&name) {
        Ok(name)
    } else {
        Err(ProxyError::BadTarget(host.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_forms_name_the_service() {
        for a in ["b", "b:80", "b.mesh", "b.mesh:8080", "B.MESH.", "user@b:80"] {
            assert_eq!(service_from_authority(a, "mesh").unwrap(), "b", "{a}");
        }
        assert!(service_from_authority("b.other", "mesh").is_err());
        assert!(service_from_authority("", "mesh").is_err());
        // The mesh domain is matched case-insensitively, on a label boundary.
        assert_eq!(service_from_authority("B.MESH:80", "mesh").unwrap(), "b");
        assert_eq!(service_from_authority("xmesh", "mesh").unwrap(), "xmesh");
        assert!(service_from_authority("é.mesh", "mesh").is_err());
    }

    #[test]
    fn absolute_uri_wins_over_host() {
        let req = Request::get("http://c/x")
            .header("host", "b")
            .body(())
            .unwrap();
        assert_eq!(target_service(&req, "mesh").unwrap(), "c");
        let req = Request::get("/x").header("host", "b:80").body(()).unwrap();
        assert_eq!(target_service(&req, "mesh").unwrap(), "b");
        let req = Request::get("/x").body(()).unwrap();
        assert!(matches!(
            target_service(&req, "mesh"),
            Err(ProxyError::NoTarget)
        ));
    }
}
