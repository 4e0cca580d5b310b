//! What the preview proxy changes on the way through, as pure functions of headers and strings:
//! the token is found and taken out in every spelling (query, cookie), and a program's response
//! loses the headers that could reach past its own preview path.
//!
//! Names are compared the way the most lenient reader would: percent-decoded (repeatedly, so
//! `%2574oken` counts too), `+` as a space, without case, with a trailing `[]` ignored. A
//! parameter the program could read as `token` is one we take out.

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

/// The preview cookie, set on the preview origin for `/preview/{project}/`.
pub const COOKIE: &str = "collab_preview";

/// Response headers a program may not send to the browser: they act on the whole origin (or
/// host) rather than on the program's own preview path.
const DROPPED: &[&str] =
    &["clear-site-data", "set-login", "set-cookie2", "service-worker-allowed", "strict-transport-security", "alt-svc"];

/// Percent-decodes `raw` once (`+` is a space); invalid escapes stay as they are.
fn decode_once(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(u8::try_from(high * 16 + low).unwrap_or(b'%'));
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `raw` decoded until it stops changing (at most a few rounds).
fn decode(raw: &str) -> String {
    let mut text = raw.to_owned();
    for _ in 0..4 {
        let next = decode_once(&text);
        if next == text {
            break;
        }
        text = next;
    }
    text
}

/// Whether a program could read the name `raw` as `wanted` (lowercase).
fn names(raw: &str, wanted: &str) -> bool {
    let name = decode(raw).trim().to_ascii_lowercase();
    let name = name.strip_suffix("[]").unwrap_or(&name);
    let name = name.strip_prefix("__host-").or_else(|| name.strip_prefix("__secure-")).unwrap_or(name);
    name == wanted
}

/// The values of every parameter of `query` (without the `?`) that names the token.
pub fn query_tokens(query: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(name, _)| names(name, "token"))
        .map(|(_, value)| decode(value))
        .collect()
}

/// `query` without the parameters that name the token or carry one of `secrets`, with its `?`;
/// empty when nothing is left.
pub fn forwarded_query(query: &str, secrets: &[&str]) -> String {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            !names(name, "token") && !carries_secret(value, secrets)
        })
        .collect();
    if kept.is_empty() { String::new() } else { format!("?{}", kept.join("&")) }
}

fn carries_secret(raw: &str, secrets: &[&str]) -> bool {
    let value = decode(raw);
    secrets.iter().any(|s| !s.is_empty() && value.contains(s))
}

/// Every `name=value` pair of the request's `Cookie` headers.
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| c.split_once('=').unwrap_or((c, "")))
}

/// The values of the request's preview cookies (a page may have planted more than one).
pub fn cookie_tokens(headers: &HeaderMap) -> Vec<String> {
    cookie_pairs(headers).filter(|(name, _)| names(name, COOKIE)).map(|(_, value)| value.to_owned()).collect()
}

/// The `Cookie` header the program gets: the request's cookies without the preview cookie (in
/// any spelling) or any cookie carrying one of `secrets`; `None` when nothing is left.
pub fn forwarded_cookie(headers: &HeaderMap, secrets: &[&str]) -> Option<HeaderValue> {
    let kept: Vec<String> = cookie_pairs(headers)
        .filter(|(name, value)| !names(name, COOKIE) && !carries_secret(value, secrets))
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    if kept.is_empty() { None } else { HeaderValue::from_str(&kept.join("; ")).ok() }
}

/// A program's `Set-Cookie` as the browser gets it, or `None` when it is dropped: a cookie
/// named like the preview cookie (it could shadow the login) or with a `Domain` (it would reach
/// other hosts) is dropped; a `Path` is moved under `prefix` (`/preview/{project}/{port}/`), the
/// program's own root, so `Path=/` stays within the program's previews.
pub fn rewritten_set_cookie(value: &str, prefix: &str) -> Option<String> {
    let mut parts = value.split(';');
    let pair = parts.next()?.trim();
    let (name, _) = pair.split_once('=')?;
    if names(name, COOKIE) {
        return None;
    }
    let mut out = vec![pair.to_owned()];
    for attribute in parts.map(str::trim).filter(|a| !a.is_empty()) {
        let (key, val) = attribute.split_once('=').unwrap_or((attribute, ""));
        match key.trim().to_ascii_lowercase().as_str() {
            "domain" => return None,
            "path" => {
                let path = val.trim();
                let under = path.strip_prefix('/').unwrap_or(path);
                out.push(format!("Path={prefix}{under}"));
            }
            _ => out.push(attribute.to_owned()),
        }
    }
    Some(out.join("; "))
}

/// Takes out of a program's response headers what may not reach the browser, and moves its
/// cookies and absolute redirects under `prefix` (`/preview/{project}/{port}/`).
pub fn filter_response(headers: &mut HeaderMap, prefix: &str) {
    for name in DROPPED {
        headers.remove(*name);
    }
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| rewritten_set_cookie(v, prefix))
        .filter_map(|v| HeaderValue::from_str(&v).ok())
        .collect();
    headers.remove(header::SET_COOKIE);
    for cookie in cookies {
        headers.append(header::SET_COOKIE, cookie);
    }
    if let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok())
        && let Some(path) = location.strip_prefix('/')
        && !path.starts_with('/')
        && !path.starts_with('\\')
        && !location.starts_with(prefix)
        && let Ok(moved) = HeaderValue::from_str(&format!("{prefix}{path}"))
    {
        headers.insert(header::LOCATION, moved);
    }
}

/// Request headers the program never gets: our credentials, and where the user came from.
pub const REQUEST_DROPPED: [HeaderName; 3] = [header::AUTHORIZATION, header::PROXY_AUTHORIZATION, header::REFERER];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_spellings() {
        for query in ["token=s", "%74oken=s", "TOKEN=s", "Token=s", "%2574oken=s", "token[]=s", "%54%4F%4B%45%4E=s"] {
            assert_eq!(query_tokens(query), vec!["s".to_owned()], "{query}");
            assert_eq!(forwarded_query(&format!("a=1&{query}&b=2"), &[]), "?a=1&b=2", "{query}");
        }
        assert_eq!(query_tokens("token=a&x=1&token=b"), vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(forwarded_query("token=a&token=b", &[]), "");
        assert_eq!(forwarded_query("t=secret&u=x%73ecret", &["secret"]), "");
        assert_eq!(forwarded_query("tokens=1&mytoken=2", &[]), "?tokens=1&mytoken=2");
    }

    #[test]
    fn cookies_lose_the_token() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; collab_preview=t1; COLLAB_PREVIEW=t2"));
        headers.append(header::COOKIE, HeaderValue::from_static("collab%5Fpreview=t3; b=2; c=t1"));
        assert_eq!(cookie_tokens(&headers), vec!["t1", "t2", "t3"]);
        assert_eq!(forwarded_cookie(&headers, &["t1"]).expect("kept"), "a=1; b=2");
    }

    #[test]
    fn set_cookie_stays_under_the_prefix() {
        let prefix = "/preview/p/8000/";
        let check = |value: &str, expected: Option<&str>| {
            assert_eq!(rewritten_set_cookie(value, prefix).as_deref(), expected, "{value}");
        };
        check("x=1; Path=/", Some("x=1; Path=/preview/p/8000/"));
        check("x=1; path=/app; HttpOnly", Some("x=1; Path=/preview/p/8000/app; HttpOnly"));
        check("x=1", Some("x=1"));
        check("x=1; Domain=127.0.0.1; Path=/", None);
        check("collab_preview=evil; Path=/preview/p/", None);
        check("__Host-Collab_Preview=evil", None);
    }

    #[test]
    fn responses_lose_origin_wide_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("clear-site-data", HeaderValue::from_static("\"cookies\""));
        headers.insert("set-login", HeaderValue::from_static("logged-out"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("x=1; Path=/"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("collab_preview=x"));
        headers.insert(header::LOCATION, HeaderValue::from_static("/next?a=1"));
        filter_response(&mut headers, "/preview/p/8000/");
        let mut lines: Vec<String> =
            headers.iter().map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?"))).collect();
        lines.sort();
        assert_eq!(
            lines,
            ["content-type: text/html", "location: /preview/p/8000/next?a=1", "set-cookie: x=1; Path=/preview/p/8000/",]
        );
        let mut already = HeaderMap::new();
        already.insert(header::LOCATION, HeaderValue::from_static("/preview/p/8000/next"));
        filter_response(&mut already, "/preview/p/8000/");
        assert_eq!(already[header::LOCATION], "/preview/p/8000/next");
        let mut elsewhere = HeaderMap::new();
        elsewhere.insert(header::LOCATION, HeaderValue::from_static("//evil.example/"));
        filter_response(&mut elsewhere, "/preview/p/8000/");
        assert_eq!(elsewhere[header::LOCATION], "//evil.example/");
    }
}
