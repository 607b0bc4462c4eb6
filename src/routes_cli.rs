//! `outrigger routes` and `outrigger ready`: talk to a running sidecar's
//! admin listener from the command line (and from container healthchecks,
//! which then need no curl in the image).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Fetch `/routes` from the admin listener at `admin`.
pub async fn fetch(admin: SocketAddr) -> Result<serde_json::Value, String> {
    let (status, body) = get(admin, "/routes").await?;
    if status != 200 {
        return Err(format!("/routes answered {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("invalid JSON from /routes: {e}"))
}

/// GET `path` from the admin listener: status and body.
pub async fn get(admin: SocketAddr, path: &str) -> Result<(u16, bytes::Bytes), String> {
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(admin)
            .await
            .map_err(|e| format!("cannot reach the admin listener at {admin}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, admin.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| format!("no answer from {admin} within 5 s"))?
}

/// Render `/routes` JSON as an aligned table.
pub fn render(v: &serde_json::Value) -> String {
    let mut rows = vec![[
        "SERVICE", "INSTANCE", "ADDRESS", "ZONE", "STATE", "WEIGHT", "INFLIGHT", "EWMA_MS", "REQS",
        "FAILS", "EJECTS", "SOURCE", "AGE_S",
    ]
    .map(String::from)];
    for s in v["services"].as_array().into_iter().flatten() {
        let name = s["name"].as_str().unwrap_or("?");
        for e in s["endpoints"].as_array().into_iter().flatten() {
            let st = &e["stats"];
            rows.push([
                name.to_string(),
                str_of(&e["instance"]),
                str_of(&e["address"]),
                str_of(&e["zone"]),
                str_of(&e["state"]),
                str_of(&e["weight"]),
                str_of(&st["in_flight"]),
                format!("{:.2}", st["ewma_ms"].as_f64().unwrap_or(0.0)),
                str_of(&st["requests"]),
                str_of(&st["failures"]),
                str_of(&st["ejections"]),
                str_of(&e["source"]),
                str_of(&e["age_s"]),
            ]);
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "generation {}{}",
        v["generation"],
        if v["stale"].as_bool() == Some(true) {
            " (STALE: a registry is unreachable)"
        } else {
            ""
        }
    );
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

fn str_of(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_rows() {
        let v = serde_json::json!({"generation": 3, "stale": false, "services": [
            {"name": "b", "endpoints": [{"instance": "b-1", "address": "h:1", "zone": null, "state": "healthy",
              "weight": 100, "source": "0-static", "age_s": 2,
              "stats": {"in_flight": 0, "ewma_ms": 1.5, "requests": 9, "failures": 0, "ejections": 0}}]}]});
        let out = super::render(&v);
        assert!(out.contains("b-1"), "{out}");
        assert!(out.lines().nth(2).unwrap().starts_with("b "), "{out}");
    }
}
