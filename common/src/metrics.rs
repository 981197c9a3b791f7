//! The daemons' Prometheus endpoint (`--metrics-listen ADDR:PORT` of the coordinator and of the
//! agent): `GET /metrics` on plain HTTP/1, answered with the text the caller renders at each
//! scrape; anything else is 404.
//!
//! What is served is the caller's business ([`Render`]); this module only bounds the server,
//! whatever its clients do: at most [`MAX_CONNECTIONS`] connections at once (more are closed
//! at accept), [`HEADER_TIME`] to send a request's headers, [`CONNECTION_TIME`] for a whole
//! connection, and a failed accept (out of file descriptors, typically) waits
//! [`ACCEPT_BACKOFF`] instead of spinning. There is no credential: callers bind an address only
//! the monitoring system reaches.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 16;
/// The longest a connection may take, request to response written.
pub const CONNECTION_TIME: Duration = Duration::from_secs(30);
/// The longest a client may take to send a request's headers.
pub const HEADER_TIME: Duration = Duration::from_secs(10);
/// The wait after a failed accept.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);
/// The `Content-Type` of the Prometheus text format, version 0.0.4 (the same string as
/// `prometheus_client::encoding::prometheus_text::CONTENT_TYPE`; the agent's tests compare them).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The text of one scrape, being rendered.
pub type Rendering = Pin<Box<dyn Future<Output = String> + Send + 'static>>;
/// Renders the `/metrics` text; called once per `GET /metrics`, from any task.
pub type Render = Arc<dyn Fn() -> Rendering + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `stop` is cancelled; connections open then are
/// left to finish within their own time limit.
pub async fn serve(listener: TcpListener, render: Render, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                "metrics listener: {MAX_CONNECTIONS} connections open; closing a new one"
            );
            continue;
        };
        tokio::spawn(connection(stream, render.clone(), slot));
    }
}

/// One connection, holding its `slot` until it ends.
async fn connection(
    stream: tokio::net::TcpStream,
    render: Render,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let _slot = slot;
    let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
        let render = render.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&req, &render).await) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIME)
        .serve_connection(io, service);
    match tokio::time::timeout(CONNECTION_TIME, conn).await {
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended"),
        Err(_) => tracing::debug!("metrics connection closed after {CONNECTION_TIME:?}"),
        Ok(Ok(())) => {}
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

/// The response to one request: the metrics for `GET /metrics`, 404 for anything else.
async fn answer<B>(req: &hyper::Request<B>, render: &Render) -> hyper::Response<Body> {
    use hyper::body::Bytes;
    if req.method() != http::Method::GET || req.uri().path() != "/metrics" {
        let mut not_found = hyper::Response::new(Body::new(Bytes::from_static(
            b"not found: the metrics are at GET /metrics\n",
        )));
        *not_found.status_mut() = http::StatusCode::NOT_FOUND;
        return not_found;
    }
    let text = render().await;
    let mut ok = hyper::Response::new(Body::new(Bytes::from(text)));
    ok.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(CONTENT_TYPE),
    );
    ok
}

/// One sample of a Prometheus text exposition: metric name, labels, value.
pub type PromSample = (String, std::collections::BTreeMap<String, String>, f64);

/// Parses a Prometheus text exposition (format 0.0.4) strictly: every line is a `# HELP`, a
/// `# TYPE` (counter, gauge, histogram, summary, untyped) or a sample `name{k="v",...} value`
/// whose family was typed before it; names and label names are valid, label values use only
/// the format's escapes, values parse (`+Inf`, `-Inf`, `NaN` included), no series repeats.
/// What a scraping Prometheus would reject is an error naming the line; so is a sample with a
/// timestamp (valid in the format, never written by the daemons).
pub fn parse_prometheus(text: &str) -> Result<Vec<PromSample>, String> {
    use std::collections::{BTreeMap, HashMap, HashSet};
    let name_ok = |n: &str, colons: bool| {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || (colons && f == ':'))
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || (colons && x == ':'))
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            match kind {
                "HELP" if name_ok(name, true) => {}
                "TYPE" if name_ok(name, true) => {
                    let t = parts.next().unwrap_or("");
                    if !matches!(t, "counter" | "gauge" | "histogram" | "summary" | "untyped") {
                        return Err(at("unknown type"));
                    }
                    if types.insert(name.to_owned(), t.to_owned()).is_some() {
                        return Err(at("family typed twice"));
                    }
                }
                "HELP" | "TYPE" => return Err(at("bad metric name")),
                _ => {}
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| at("bad value"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| at("unclosed labels"))?;
                let mut labels = BTreeMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    if !name_ok(&key, false) || chars.next() != Some('"') {
                        return Err(at("bad label"));
                    }
                    let mut val = String::new();
                    loop {
                        match chars.next() {
                            Some('"') => break,
                            Some('\\') => match chars.next() {
                                Some('\\') => val.push('\\'),
                                Some('"') => val.push('"'),
                                Some('n') => val.push('\n'),
                                _ => return Err(at("bad escape in a label value")),
                            },
                            Some(c) => val.push(c),
                            None => return Err(at("unterminated label value")),
                        }
                    }
                    if labels.insert(key, val).is_some() {
                        return Err(at("label repeated"));
                    }
                    match chars.next() {
                        Some(',') | None => {}
                        Some(_) => return Err(at("labels not separated by commas")),
                    }
                }
                (name, labels)
            }
        };
        if !name_ok(name, true) {
            return Err(at("bad metric name"));
        }
        let family = ["_total", "_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        if !types.contains_key(family) {
            return Err(at("sample of a family with no TYPE before it"));
        }
        if !seen.insert(format!("{name}{labels:?}")) {
            return Err(at("series repeated"));
        }
        out.push((name.to_owned(), labels, value));
    }
    Ok(out)
}

/// The distinct metric names in `text` that start with `prefix` (a dashboard's queries, say),
/// sorted: each a run of ASCII letters, digits and `_` from the prefix on.
pub fn metric_names_in<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut names: Vec<&str> = text
        .match_indices(prefix)
        .map(|(i, _)| {
            let rest = &text[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One request on a new connection: the whole response as text.
    async fn try_request(addr: std::net::SocketAddr, line: &str) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("{line}\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    async fn request(addr: std::net::SocketAddr, line: &str) -> String {
        try_request(addr, line).await.expect("a served request")
    }

    #[tokio::test]
    async fn metrics_are_rendered_per_scrape_and_other_paths_are_404() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = scrapes.clone();
        let render: Render = Arc::new(move || {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            Box::pin(async move { format!("scrapes {n}\n") })
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, render, stop.clone()));
        let out = tokio::time::timeout(Duration::from_secs(10), async {
            let first = request(addr, "GET /metrics HTTP/1.1").await;
            let second = request(addr, "GET /metrics?x=1 HTTP/1.1").await;
            let other = request(addr, "GET /other HTTP/1.1").await;
            let post = request(addr, "POST /metrics HTTP/1.1").await;
            (first, second, other, post)
        })
        .await
        .expect("answers within 10 s");
        let (first, second, other, post) = out;
        assert!(first.starts_with("HTTP/1.1 200 "), "{first}");
        assert!(
            first
                .to_ascii_lowercase()
                .contains(&format!("content-type: {CONTENT_TYPE}")),
            "{first}"
        );
        assert!(first.ends_with("\r\n\r\nscrapes 1\n"), "{first}");
        assert!(second.ends_with("\r\n\r\nscrapes 2\n"), "{second}");
        assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
        assert!(post.starts_with("HTTP/1.1 404 "), "{post}");
        assert_eq!(scrapes.load(std::sync::atomic::Ordering::Relaxed), 2);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns once stopped")
            .unwrap();
    }

    #[tokio::test]
    async fn connections_above_the_limit_are_closed_at_accept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Render = Arc::new(|| Box::pin(async { "up 1\n".to_owned() }));
        let stop = CancellationToken::new();
        let _server = tokio::spawn(serve(listener, render, stop.clone()));
        // Idle connections hold every slot (each waits up to HEADER_TIME for its headers).
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("the extra connection is closed, not left waiting");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // A slot freed is a slot taken again.
        drop(idle.pop());
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            poll_until_served(addr, "GET /metrics HTTP/1.1"),
        )
        .await
        .expect("served once a slot is free");
        assert!(out.ends_with("up 1\n"), "{out}");
        stop.cancel();
    }

    /// Repeats the request until one is answered (the server notices a closed connection at
    /// its next read, not at once), for at most 10 s.
    async fn poll_until_served(addr: std::net::SocketAddr, line: &str) -> String {
        let served = async {
            loop {
                if let Ok(out) = try_request(addr, line).await
                    && out.starts_with("HTTP/1.1 200 ")
                {
                    return out;
                }
                // The poll interval of a condition with a deadline (below), not a wait.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("a request served within 10 s once a connection slot was free")
    }

    #[test]
    fn a_valid_exposition_parses_and_bad_lines_are_named() {
        let ok = "# HELP a_total A.\n# TYPE a counter\na_total{reason=\"x\\\"y\"} 3\n\
                  # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n\
                  # TYPE g gauge\ng NaN\n";
        let s = parse_prometheus(ok).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].1["reason"], "x\"y");
        assert_eq!(s[0].2, 3.0);
        for bad in [
            "x 1\n",
            "# TYPE x gauge\nx{a=\"1\" 2\n",
            "# TYPE x gauge\nx one\n",
            "# TYPE x gauge\nx 1\nx 2\n",
            "# TYPE x gauge\nx{1a=\"b\"} 1\n",
            "# TYPE x thing\n",
        ] {
            assert!(parse_prometheus(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metric_names_are_found_once_each() {
        let text =
            r#"{"expr": "rate(ringmaster_a_total[1m]) / ringmaster_b", "x": "ringmaster_a_total"}"#;
        assert_eq!(
            metric_names_in(text, "ringmaster_"),
            ["ringmaster_a_total", "ringmaster_b"]
        );
        assert!(metric_names_in(text, "other_").is_empty());
    }
}
