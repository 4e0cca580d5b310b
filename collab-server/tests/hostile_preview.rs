//! The preview proxy against a hostile visitor and a hostile program: a real server with the
//! local sandbox, a Python program in a terminal that echoes what it is sent and answers with
//! headers that would reach past its own path, and requests from hyper's client.

mod common;

use std::time::Duration;

use collab_server::archive::ArchiveFile;
use collab_server::exec::SandboxKind;
use collab_test_support::http;
use common::TestServer;
use common::exec_peer::ExecPeer;
use exec_bridge::protocol::{ClientMsg, Data, ServerMsg};
use sync_core::Role;

/// Echoes the request line and headers as the body, and answers with a cookie for `/`, one
/// named like the preview cookie, one for a domain, and headers that act on a whole origin.
const HOSTILE: &str = r#"
import http.server

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.path + '\n' + str(self.headers)).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'text/plain')
        self.send_header('Set-Cookie', 'x=1; Path=/')
        self.send_header('Set-Cookie', 'collab_preview=planted; Path=/preview/')
        self.send_header('Set-Cookie', 'wide=1; Domain=127.0.0.1; Path=/')
        self.send_header('Clear-Site-Data', '"cookies", "storage"')
        self.send_header('Set-Login', 'logged-out')
        self.send_header('Service-Worker-Allowed', '/')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

print('hostile ready', flush=True)
http.server.HTTPServer(('', 8000), Handler).serve_forever()
"#;

const UNAUTHORIZED: &str = "this preview is for the project's members: open it from the project's page\n";

struct Setup {
    server: TestServer,
    /// `host:port` of the preview listener.
    preview: String,
    /// An editor's token for project `hp`.
    token: String,
    _peer: ExecPeer,
}

/// A server with previews on, and [`HOSTILE`] listening on port 8000 of project `hp`.
async fn setup() -> Setup {
    let server = TestServer::start_with(|c| {
        c.sandbox = SandboxKind::Local;
        c.exec_idle = Duration::from_secs(600);
        c.preview_listen = Some("127.0.0.1:0".parse().expect("an address"));
        c.preview_url = Some("http://localhost:1".into());
    })
    .await;
    let files = [ArchiveFile { path: "hostile.py".into(), text: HOSTILE.into() }];
    collab_server::project::write_files(&server.app().rooms, "hp", &files).await.expect("files written");
    let token = server.token("hp", Role::Editor, "ann");
    let mut peer = ExecPeer::connect(&server.url, "hp", &token).await;
    let file = server.app().exec.workspace("hp").join("hostile.py");
    common::until("hostile.py in the workspace", || std::fs::read_to_string(&file).is_ok_and(|t| t == HOSTILE)).await;
    peer.send(&ClientMsg::TermOpen { cols: 120, rows: 24 }).await;
    let opened = peer.until("terminal opened", |m| matches!(m, ServerMsg::TermOpened { .. })).await;
    let ServerMsg::TermOpened { term, .. } = opened else { unreachable!() };
    peer.send(&ClientMsg::TermInput { term, data: Data(b"python3 hostile.py\n".to_vec()) }).await;
    peer.until_term_text(term, "hostile ready").await;
    let preview = server.app().preview.as_ref().expect("previews are on").addr.to_string();
    Setup { server, preview, token, _peer: peer }
}

/// `GET path` on `addr` with `headers`.
async fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> http::Response {
    let mut request = http::Request::new("GET", path);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    request.send(addr).await.expect("a response")
}

fn set_cookies(response: &http::Response) -> Vec<String> {
    response.headers.get_all("set-cookie").iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect()
}

/// One test, because the program takes seconds to start: every rule on one running program.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_preview() {
    let Setup { server, preview, token, _peer } = setup().await;
    let at = preview.as_str();

    // Strangers: no token, another project's token, a bad token next to nothing else.
    let none = get(at, "/preview/hp/8000/echo", &[]).await;
    assert_eq!((none.status, none.text().as_str()), (401, UNAUTHORIZED));
    let stranger = server.token("other", Role::Editor, "eve");
    for path in [format!("/preview/hp/8000/echo?token={stranger}"), format!("/preview/hp/8000/echo?TOKEN={stranger}")] {
        let refused = get(at, &path, &[]).await;
        assert_eq!((refused.status, refused.text().as_str()), (401, UNAUTHORIZED), "{path}");
        assert!(set_cookies(&refused).is_empty(), "{path}");
    }
    let cookie = format!("collab_preview={stranger}");
    let refused = get(at, "/preview/hp/8000/echo", &[("cookie", &cookie)]).await;
    assert_eq!((refused.status, refused.text().as_str()), (401, UNAUTHORIZED), "another project's cookie");

    // The token in any spelling is moved into the cookie, and every spelling leaves the address.
    let spellings = [
        format!("?%74oken={token}&v=1"),
        format!("?v=1&Token={token}"),
        format!("?token=wrong&v=1&token={token}&%54OKEN=again"),
        format!("?v=1&token%5B%5D={token}"),
    ];
    for query in &spellings {
        let moved = get(at, &format!("/preview/hp/8000/echo{query}"), &[]).await;
        assert_eq!(moved.status, 307, "{query}: {}", moved.header_lines());
        assert_eq!(moved.header("location"), Some("/preview/hp/8000/echo?v=1"), "{query}");
        assert_eq!(
            set_cookies(&moved),
            [format!("collab_preview={token}; Path=/preview/hp/; HttpOnly; SameSite=Lax")],
            "{query}"
        );
    }

    // What the program gets: no Referer, no Authorization, no token in the query or cookies.
    let cookies = format!("theme=dark; collab_preview={token}; COLLAB_PREVIEW={token}; copy={token}");
    let referer = format!("http://localhost:1/preview/hp/8000/?token={token}");
    let bearer = format!("Bearer {token}");
    let echoed = get(
        at,
        &format!("/preview/hp/8000/echo?a=1&leak={token}"),
        &[("cookie", &cookies), ("referer", &referer), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(echoed.status, 200, "{}", echoed.text());
    let seen = echoed.text();
    assert!(seen.starts_with("/echo?a=1\n"), "{seen}");
    assert!(!seen.contains(&token[..20]), "the token reached the program: {seen}");
    let seen_lower = seen.to_ascii_lowercase();
    assert!(!seen_lower.contains("referer") && !seen_lower.contains("authorization"), "{seen}");
    assert!(seen_lower.contains("cookie: theme=dark\n"), "{seen}");

    // What the browser gets back: the program's cookie under its own path, nothing that would
    // shadow the login or reach other paths, hosts or the whole origin.
    assert_eq!(set_cookies(&echoed), ["x=1; Path=/preview/hp/8000/"], "{}", echoed.header_lines());
    for name in ["clear-site-data", "set-login", "service-worker-allowed", "content-security-policy"] {
        assert!(echoed.header(name).is_none(), "{name}: {}", echoed.header_lines());
    }

    // The IDE's listener serves no preview: it sends the browser to the preview origin.
    let ide = server.http_addr();
    let sent = get(ide, &format!("/preview/hp/8000/echo?token={token}"), &[]).await;
    assert_eq!(sent.status, 307);
    assert_eq!(
        sent.header("location"),
        Some(format!("http://localhost:1/preview/hp/8000/echo?token={token}").as_str())
    );
    let config = get(ide, "/api/config", &[]).await;
    assert_eq!(config.text(), r#"{"preview_url":"http://localhost:1"}"#);
    // ...and its own pages forbid foreign code and send no Referer.
    let page = get(ide, "/healthz", &[]).await;
    assert!(page.header("content-security-policy").is_some_and(|c| c.starts_with("default-src 'self'")));
    assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
    // The preview origin serves previews and nothing else.
    for path in ["/healthz", "/api/config", "/", "/sync"] {
        let response = get(at, path, &[]).await;
        assert_eq!((response.status, response.text().as_str()), (404, "no such preview\n"), "{path}");
    }
    server.stop().await;
}

/// Without `--preview-listen` there are no previews: the IDE's listener says so, and tells its
/// page there is nowhere to link to.
#[tokio::test]
async fn previews_off() {
    let server = TestServer::start().await;
    let token = server.token("hp", Role::Editor, "ann");
    let response = get(server.http_addr(), &format!("/preview/hp/8000/?token={token}"), &[]).await;
    assert_eq!((response.status, response.text().as_str()), (404, "previews are off on this server\n"));
    let config = get(server.http_addr(), "/api/config", &[]).await;
    assert_eq!(config.text(), r#"{"preview_url":null}"#);
    server.stop().await;
}

/// With `{project}` in the preview URL every project has a host of its own: a request must come
/// for its project's host, and the IDE sends each project's previews to its host.
#[tokio::test]
async fn a_host_per_project() {
    let server = TestServer::start_with(|c| {
        c.preview_listen = Some("127.0.0.1:0".parse().expect("an address"));
        c.preview_url = Some("http://{project}.localhost:1".into());
    })
    .await;
    let preview = server.app().preview.as_ref().expect("previews are on").addr.to_string();
    let token = server.token("hp", Role::Editor, "ann");
    let own = get(&preview, "/preview/hp/8000/", &[("host", "HP.localhost:1")]).await;
    assert_eq!((own.status, own.text().as_str()), (401, UNAUTHORIZED), "its own host, no token");
    let moved = get(&preview, &format!("/preview/hp/8000/?token={token}"), &[("host", "hp.localhost:1")]).await;
    assert_eq!(moved.status, 307, "its own host, a member's token");
    for host in ["other.localhost:1", "localhost:1", preview.as_str()] {
        let path = format!("/preview/hp/8000/?token={token}");
        let elsewhere = get(&preview, &path, &[("host", host)]).await;
        assert_eq!((elsewhere.status, elsewhere.text().as_str()), (404, "no such preview\n"), "{host}");
    }
    let sent = get(server.http_addr(), &format!("/preview/hp/8000/x?token={token}"), &[]).await;
    assert_eq!(
        sent.header("location"),
        Some(format!("http://hp.localhost:1/preview/hp/8000/x?token={token}").as_str())
    );
    let config = get(server.http_addr(), "/api/config", &[]).await;
    assert_eq!(config.text(), r#"{"preview_url":"http://{project}.localhost:1"}"#);
    server.stop().await;
}
