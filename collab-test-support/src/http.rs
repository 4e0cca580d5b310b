//! The one HTTP client of the tests: a request on a fresh connection over hyper's client (the
//! kind of client a stranger would use, not a parser of our own), and the whole response back.
//! Every exchange is bounded by [`WAIT`](crate::WAIT).

use std::io;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap};
use hyper_util::rt::TokioIo;

use crate::wait::WAIT;

/// A response, read to its end.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first value of header `name`, if it is there and readable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// Every header as a `name: value` line (names in lowercase), for searches and failure
    /// messages.
    pub fn header_lines(&self) -> String {
        let lines: Vec<String> = self
            .headers
            .iter()
            .map(|(name, value)| format!("{name}: {}", String::from_utf8_lossy(value.as_bytes())))
            .collect();
        lines.join("\n")
    }
}

/// A request to build up and send.
#[derive(Debug)]
pub struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    /// `method path` (the path with its query string).
    pub fn new(method: &str, path: &str) -> Request {
        Request { method: method.to_owned(), path: path.to_owned(), headers: Vec::new(), body: Vec::new() }
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// `Authorization: Bearer {token}`.
    pub fn bearer(self, token: &str) -> Request {
        let value = format!("Bearer {token}");
        self.header(header::AUTHORIZATION.as_str(), &value)
    }

    pub fn body(mut self, body: &[u8]) -> Request {
        self.body = body.to_vec();
        self
    }

    /// Sends the request to `addr` (`host:port`) over a new connection and reads the response
    /// to its end; an error if nothing answers, the exchange breaks, or it takes over [`WAIT`].
    pub async fn send(self, addr: &str) -> io::Result<Response> {
        match tokio::time::timeout(WAIT, self.exchange(addr)).await {
            Ok(result) => result,
            Err(_) => {
                Err(io::Error::new(io::ErrorKind::TimedOut, format!("no whole response from {addr} in {WAIT:?}")))
            }
        }
    }

    async fn exchange(self, addr: &str) -> io::Result<Response> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let method = hyper::Method::from_bytes(self.method.as_bytes()).map_err(io::Error::other)?;
        let mut request = hyper::Request::builder().method(method).uri(&self.path);
        // `Host` is `addr` unless the request names another.
        if !self.headers.iter().any(|(name, _)| name.eq_ignore_ascii_case(header::HOST.as_str())) {
            request = request.header(header::HOST, addr);
        }
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request.body(Full::new(Bytes::from(self.body))).map_err(io::Error::other)?;
        let response = sender.send_request(request).await.map_err(io::Error::other)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.map_err(io::Error::other)?.to_bytes().to_vec();
        Ok(Response { status, headers, body })
    }
}

/// `GET path` at `addr`.
pub async fn get(addr: &str, path: &str) -> io::Result<Response> {
    Request::new("GET", path).send(addr).await
}
