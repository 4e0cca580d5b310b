//! Metrics as `/metrics` serves them: one sample read out of Prometheus text, and a wait for a
//! sample to reach a value.

use crate::wait;

/// The value of the unlabelled sample `name` (the first line `name <value>`), if there is one.
pub fn value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `name` as the server at `addr` (`host:port`) reports it now; `None` if it does not answer or
/// has no such sample.
pub async fn scrape(addr: &str, name: &str) -> Option<f64> {
    let response = crate::http::get(addr, "/metrics").await.ok()?;
    value(&response.text(), name)
}

/// Waits until `name` at `addr` satisfies `want`, and returns the value; on timeout the panic
/// message ends with `explain()` (a log tail).
pub async fn await_value(addr: &str, name: &str, want: impl Fn(f64) -> bool, explain: impl Fn() -> String) -> f64 {
    let what = format!("{name} at {addr} to reach the wanted value");
    wait::poll(&what, wait::WAIT, || async { scrape(addr, name).await.filter(|v| want(*v)) }, explain).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_by_exact_name() {
        let text = "# HELP collab_bus_connected 1 while...\ncollab_bus_connected_total 5\ncollab_bus_connected 1\n";
        assert_eq!(value(text, "collab_bus_connected"), Some(1.0));
        assert_eq!(value(text, "collab_bus_connected_total"), Some(5.0));
        assert_eq!(value(text, "collab_documents_loaded"), None);
    }
}
