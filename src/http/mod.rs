//! HTTP pieces shared by every listener: the body type, header hygiene, the
//! one place errors become responses, the server-side connection setup, and
//! the byte-level connection guards (first-request deadline, smuggling check).

pub mod body;
pub mod conn_guard;
pub mod error;
pub mod first_read;
pub mod framing;
pub mod h1_server;
pub mod headers;
pub mod server;
pub mod upgrade;
pub mod woken;

pub use body::Body;
pub use error::ProxyError;
