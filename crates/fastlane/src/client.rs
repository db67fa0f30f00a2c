//! A minimal HTTP/1.1 client: one request per connection, body read whole.
//!
//! It exists for tests and for `fastlane probe`, which need real sockets and
//! nothing else; it is not a general-purpose client (no TLS, no redirects,
//! no pooling).
//!
//! # Examples
//!
//! ```no_run
//! # async fn run() -> Result<(), fastlane::client::ClientError> {
//! let response = fastlane::client::get("http://127.0.0.1:8000/fast").await?;
//! assert_eq!(response.status, 200);
//! println!("{}", response.text());
//! # Ok(()) }
//! ```

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a request failed before a response arrived.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The URL is not a valid `http://host:port/path` URL.
    #[error("invalid URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCP connection could not be made.
    #[error("could not connect to {addr}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection closed, malformed response).
    #[error("HTTP error")]
    Http(#[from] hyper::Error),
}

/// A response, with its body read whole.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Response {
    /// The status code.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// `GET url`.
pub async fn get(url: &str) -> Result<Response, ClientError> {
    request(Method::GET, url, None).await
}

/// `GET url`, taking the URL by value: handy for `tokio::spawn`.
pub async fn get_owned(url: String) -> Result<Response, ClientError> {
    request(Method::GET, &url, None).await
}

/// `POST url` with a JSON body.
pub async fn post_json(url: &str, body: &serde_json::Value) -> Result<Response, ClientError> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    request(Method::POST, url, Some(("application/json", bytes))).await
}

/// Sends one request on a new connection and reads the whole response.
pub async fn request(
    method: Method,
    url: &str,
    body: Option<(&str, Bytes)>,
) -> Result<Response, ClientError> {
    let target = Target::parse(url)?;
    let stream = TcpStream::connect(&target.authority)
        .await
        .map_err(|source| ClientError::Connect { addr: target.authority.clone(), source })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection task ends when the response is read (or fails).
    tokio::spawn(async move {
        let _ = conn.await;
    });

    let mut builder = http::Request::builder().method(method).uri(target.path_and_query);
    let headers = builder.headers_mut().expect("a fresh builder has headers");
    if let Ok(host) = HeaderValue::from_str(&target.authority) {
        headers.insert(http::header::HOST, host);
    }
    let payload = match body {
        Some((content_type, bytes)) => {
            if let Ok(value) = HeaderValue::from_str(content_type) {
                headers.insert(http::header::CONTENT_TYPE, value);
            }
            bytes
        }
        None => Bytes::new(),
    };
    let req = builder
        .body(Full::new(payload))
        .map_err(|e| ClientError::InvalidUrl { url: url.to_owned(), reason: e.to_string() })?;
    let response = sender.send_request(req).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response { status: parts.status, headers: parts.headers, body })
}

struct Target {
    authority: String,
    path_and_query: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, ClientError> {
        let invalid =
            |reason: &str| ClientError::InvalidUrl { url: url.to_owned(), reason: reason.to_owned() };
        let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(invalid("https is not supported; use http://")),
            Some(other) => return Err(invalid(&format!("unsupported scheme `{other}`"))),
            None => return Err(invalid("missing `http://`")),
        }
        let host = uri.host().ok_or_else(|| invalid("missing host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Self { authority: format!("{host}:{port}"), path_and_query })
    }
}
