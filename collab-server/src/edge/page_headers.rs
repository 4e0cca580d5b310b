//! The headers every response of the IDE's own listener carries: a content security policy
//! that lets the page load only its own code, and no `Referer` to other sites (the page's
//! address holds the user's token).

use axum::http::{HeaderName, HeaderValue, header};
use axum::response::Response;

/// Scripts, styles, fonts and sockets from the IDE's origin only. CodeMirror and xterm.js set
/// inline styles, and the favicon is a `data:` image.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; font-src 'self' data:; connect-src 'self' ws: wss:; object-src 'none'; \
    base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const HEADERS: [(HeaderName, &str); 3] = [
    (header::CONTENT_SECURITY_POLICY, CSP),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
];

/// Adds [`HEADERS`] to `response`.
pub async fn add(mut response: Response) -> Response {
    for (name, value) in HEADERS {
        response.headers_mut().insert(name, HeaderValue::from_static(value));
    }
    response
}
