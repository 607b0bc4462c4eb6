//! HTTP pieces shared by every listener: the body type, header hygiene, the
//! one place errors become responses, and the server-side connection setup.

pub mod body;
pub mod error;
pub mod headers;
pub mod server;
pub mod upgrade;

pub use body::Body;
pub use error::ProxyError;
