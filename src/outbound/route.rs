//! Which service a request from the local service names.
//!
//! `HTTP_PROXY` clients send the absolute form (`GET http://b/path`); others
//! send `Host: b`, `b:80` or `b.<mesh_domain>`; HTTP/2 clients send
//! `:authority`. All name service `b`.

use http::Request;

use crate::http::ProxyError;
use crate::registry::is_service_name;

/// Extract the target service name.
pub fn target_service<B>(req: &Request<B>, mesh_domain: &str) -> Result<String, ProxyError> {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or(ProxyError::NoTarget)?,
    };
    service_from_authority(authority, mesh_domain)
}

/// `b`, `b:80`, `b.mesh`, `B.Mesh.` → `b`.
pub fn service_from_authority(authority: &str, mesh_domain: &str) -> Result<String, ProxyError> {
    // Drop userinfo and port; a service name never contains ':' or '@'.
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let mut name = host.to_ascii_lowercase();
    let suffix_len = mesh_domain.len() + 1;
    if !mesh_domain.is_empty()
        && name.len() > suffix_len
        && name.ends_with(mesh_domain)
        && name.as_bytes()[name.len() - suffix_len] == b'.'
    {
        name.truncate(name.len() - suffix_len);
    }
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
