//! deploy/haproxy.cfg made local: the listening address and the node list put in place of the
//! lines the template marks. One implementation, used by `cargo xtask cluster` and by the tests
//! that put HAProxy in front of real nodes (collab-test-support's `Balanced`).

/// Where Debian's haproxy package installs the proxy.
pub const BINARY: &str = "/usr/sbin/haproxy";

/// The template, relative to the workspace root.
pub const TEMPLATE: &str = "deploy/haproxy.cfg";

const LISTEN_MARKER: &str = "# collab:listen";
const SERVERS_BEGIN: &str = "# collab:servers begin";
const SERVERS_END: &str = "# collab:servers end";

/// What is wrong with a template.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("`{LISTEN_MARKER}` in {TEMPLATE} is not followed by a `bind` line")]
    NoBindAfterListen,
    #[error("`{SERVERS_BEGIN}` in {TEMPLATE} has no `{SERVERS_END}`")]
    UnclosedServers,
    #[error("{TEMPLATE} lacks the `{LISTEN_MARKER}` or `{SERVERS_BEGIN}` marker")]
    MissingMarker,
}

/// The workspace's own template (`deploy/haproxy.cfg`), read at run time from `root`.
pub fn read_template(root: &std::path::Path) -> std::io::Result<String> {
    std::fs::read_to_string(root.join(TEMPLATE))
}

/// `template` with the `bind` line after `# collab:listen` replaced by `bind {listen}`, and the
/// lines between `# collab:servers begin` and `end` by one `server {entry}` line per entry (an
/// entry is a name, an address and optional keywords: `node1 127.0.0.1:8081`).
pub fn config(template: &str, listen: &str, servers: &[String]) -> Result<String, TemplateError> {
    let mut out = Vec::new();
    let mut lines = template.lines();
    let (mut listen_done, mut servers_done) = (false, false);
    while let Some(line) = lines.next() {
        out.push(line.to_owned());
        let indent = &line[..line.len() - line.trim_start().len()];
        match line.trim() {
            LISTEN_MARKER => {
                match lines.next() {
                    Some(bind) if bind.trim_start().starts_with("bind ") => {}
                    _ => return Err(TemplateError::NoBindAfterListen),
                }
                out.push(format!("{indent}bind {listen}"));
                listen_done = true;
            }
            SERVERS_BEGIN => {
                if !lines.any(|l| l.trim() == SERVERS_END) {
                    return Err(TemplateError::UnclosedServers);
                }
                out.extend(servers.iter().map(|entry| format!("{indent}server {entry}")));
                out.push(format!("{indent}{SERVERS_END}"));
                servers_done = true;
            }
            _ => {}
        }
    }
    if !listen_done || !servers_done {
        return Err(TemplateError::MissingMarker);
    }
    out.push(String::new());
    Ok(out.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE_TEXT: &str = "frontend f\n    # collab:listen\n    bind :8080\n    default_backend b\n\
        backend b\n    # collab:servers begin\n    server node1 collab1:8080\n    # collab:servers end\n    # after\n";

    #[test]
    fn the_marked_lines_are_replaced_and_the_rest_kept() {
        let servers = ["node1 127.0.0.1:8081".to_owned(), "node2 127.0.0.1:8082".to_owned()];
        let text = config(TEMPLATE_TEXT, "127.0.0.1:8080", &servers).unwrap();
        assert_eq!(
            text,
            "frontend f\n    # collab:listen\n    bind 127.0.0.1:8080\n    default_backend b\nbackend b\n    \
             # collab:servers begin\n    server node1 127.0.0.1:8081\n    server node2 127.0.0.1:8082\n    \
             # collab:servers end\n    # after\n"
        );
    }

    #[test]
    fn a_template_without_markers_is_refused() {
        assert_eq!(config("frontend f\n    bind :8080\n", "127.0.0.1:1", &[]), Err(TemplateError::MissingMarker));
        let no_end = TEMPLATE_TEXT.replace("# collab:servers end", "");
        assert_eq!(config(&no_end, "127.0.0.1:1", &[]), Err(TemplateError::UnclosedServers));
        let no_bind = TEMPLATE_TEXT.replace("    bind :8080\n", "");
        assert_eq!(config(&no_bind, "127.0.0.1:1", &[]), Err(TemplateError::NoBindAfterListen));
    }

    #[test]
    fn the_deploy_config_has_both_markers() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let template = read_template(root).unwrap();
        let text = config(&template, "127.0.0.1:18080", &["node1 127.0.0.1:18081".to_owned()]).unwrap();
        assert!(text.contains("\n    bind 127.0.0.1:18080\n"));
        assert!(text.contains("\n    server node1 127.0.0.1:18081\n"));
        assert!(!text.contains("collab2:8080"));
    }
}
