//! A minimal HTTP/1.1 client for one thing: POSTing a notification's JSON
//! to an `http://` URL (`converge run --notify URL`), with its signature
//! header, and reading the status line of the answer.
//!
//! No HTTP client crate is on the dependency list, and a webhook needs one
//! request with `Connection: close`, so this is a few lines over tokio's
//! `TcpStream` rather than a new dependency. `https://` is refused when the
//! URL is parsed, saying to use `--notify-exec` with curl instead (TLS
//! would need a TLS stack, which is not worth it for a notification a
//! command hook can send). URLs with credentials are refused too, so that
//! none ends up in a log; logs name a URL by its host and port only, since
//! a path or query may hold a token.

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::sink::{Delivery, Sink, SinkError};

/// Bound on the answer's head that is read for its status line.
const HEAD_LIMIT: usize = 8 * 1024;

/// An `http://` URL, parsed and checked for what a request line needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    host: String,
    port: u16,
    /// Path and query, as sent in the request line.
    target: String,
    /// `http://host:port`: no path or query (either may hold a token), for logs.
    shown: String,
}

/// Why a `--notify` URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error(
        "{url}: https is not supported by --notify (converge has no TLS client); \
         send it with --notify-exec and curl instead, e.g. \
         --notify-exec 'curl -fsS -H \"Content-Type: application/json\" --data-binary @- https://…'"
    )]
    Https { url: String },
    #[error("{url}: a --notify URL starts with http:// (or use --notify-exec for anything else)")]
    Scheme { url: String },
    #[error("{url}: no host after http://")]
    NoHost { url: String },
    #[error("{url}: `{port}` is not a port number")]
    Port { url: String, port: String },
    #[error(
        "a --notify URL must not carry credentials (user:password@): they would end up in logs; \
         give --notify-exec a script that reads them from a file instead"
    )]
    Credentials,
    #[error("{url}: spaces and control characters are not allowed in a URL (percent-encode them)")]
    Characters { url: String },
}

impl WebhookUrl {
    /// Parses `http://host[:port][/path][?query]`.
    pub fn parse(url: &str) -> Result<WebhookUrl, UrlError> {
        let lower = url.to_ascii_lowercase();
        let Some(rest) = lower
            .strip_prefix("http://")
            .map(|_| &url["http://".len()..])
        else {
            return Err(if lower.starts_with("https://") {
                UrlError::Https {
                    url: shown_prefix(url),
                }
            } else {
                UrlError::Scheme {
                    url: shown_prefix(url),
                }
            });
        };
        let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(split);
        if authority.contains('@') {
            return Err(UrlError::Credentials);
        }
        let tail = tail.split('#').next().unwrap_or("");
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(UrlError::Characters {
                url: shown_prefix(url),
            });
        }
        let (host, port) = split_host_port(authority).map_err(|port| UrlError::Port {
            url: format!("http://{authority}"),
            port,
        })?;
        if host.is_empty() {
            return Err(UrlError::NoHost {
                url: url.to_owned(),
            });
        }
        let target = if tail.starts_with('/') {
            tail.to_owned()
        } else {
            format!("/{tail}")
        };
        let shown = format!("http://{authority}");
        Ok(WebhookUrl {
            host,
            port,
            target,
            shown,
        })
    }

    /// The URL as logs show it: scheme, host and port only.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The `Host` header's value.
    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// What of a refused URL may be shown: its scheme and host, never a path
/// or query that may hold a token.
fn shown_prefix(url: &str) -> String {
    let end = url
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| url[start..].find(['/', '?']).map(|i| start + i))
        .unwrap_or(url.len());
    url[..end].chars().filter(|c| !c.is_control()).collect()
}

/// `host[:port]` or `[v6][:port]`; `Err` carries the port text that is not a number.
fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, rest)) => (host, rest.strip_prefix(':')),
            None => return Err(authority.to_owned()),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None | Some("") => 80,
        Some(p) => p.parse::<u16>().map_err(|_| p.to_owned())?,
    };
    Ok((host.to_owned(), port))
}

/// POSTs `delivery`'s body to `url` within `timeout`; returns the status
/// of a 2xx answer.
pub async fn post(
    url: &WebhookUrl,
    delivery: &Delivery,
    timeout: Duration,
) -> Result<u16, SinkError> {
    match tokio::time::timeout(timeout, post_unbounded(url, delivery)).await {
        Ok(result) => result,
        Err(_) => Err(SinkError::Timeout {
            url: url.shown.clone(),
            secs: timeout.as_secs(),
        }),
    }
}

async fn post_unbounded(url: &WebhookUrl, delivery: &Delivery) -> Result<u16, SinkError> {
    let shown = || url.shown.clone();
    let mut stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|source| SinkError::Connect {
            url: shown(),
            source,
        })?;
    let mut head = format!(
        "POST {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: converge/{version}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n",
        target = url.target,
        host = url.host_header(),
        version = env!("CARGO_PKG_VERSION"),
        length = delivery.body.len(),
    );
    if let Some(signature) = &delivery.signature {
        head.push_str(&format!("X-Converge-Signature-256: {signature}\r\n"));
    }
    head.push_str("\r\n");
    let io = |source| SinkError::Io {
        url: shown(),
        source,
    };
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(&delivery.body).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") && answer.len() < HEAD_LIMIT {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&answer);
    let line = line.lines().next().unwrap_or("");
    let status = parse_status_line(line).ok_or_else(|| SinkError::NotHttp {
        url: shown(),
        head: line.chars().take(80).collect(),
    })?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(SinkError::Status {
            url: shown(),
            status,
        })
    }
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status_line(line: &str) -> Option<u16> {
    let mut words = line.split_whitespace();
    let version = words.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    let code = words.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// `--notify URL`: each delivery one POST.
#[derive(Debug)]
pub struct WebhookSink {
    url: WebhookUrl,
    timeout: Duration,
}

impl WebhookSink {
    pub fn new(url: WebhookUrl, timeout: Duration) -> WebhookSink {
        WebhookSink { url, timeout }
    }
}

impl Sink for WebhookSink {
    fn name(&self) -> &str {
        self.url.shown()
    }

    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move { post(&self.url, delivery, self.timeout).await.map(drop) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_host_port_and_target() {
        let url = WebhookUrl::parse("http://127.0.0.1:8080/hooks/converge?token=abc").unwrap();
        assert_eq!(url.host, "127.0.0.1");
        assert_eq!(url.port, 8080);
        assert_eq!(url.target, "/hooks/converge?token=abc");
        assert_eq!(url.shown(), "http://127.0.0.1:8080");
        assert_eq!(url.host_header(), "127.0.0.1:8080");

        let url = WebhookUrl::parse("HTTP://example.org").unwrap();
        assert_eq!((url.port, url.target.as_str()), (80, "/"));
        assert_eq!(url.host_header(), "example.org");

        let url = WebhookUrl::parse("http://[::1]:9000?x=1#frag").unwrap();
        assert_eq!(url.host, "::1");
        assert_eq!(url.target, "/?x=1");
        assert_eq!(url.host_header(), "[::1]:9000");
    }

    #[test]
    fn https_credentials_and_bad_urls_are_refused_with_what_to_do() {
        let https = WebhookUrl::parse("https://ntfy.sh/topic").unwrap_err();
        assert!(matches!(https, UrlError::Https { .. }));
        assert!(https.to_string().contains("--notify-exec"), "{https}");
        assert!(https.to_string().contains("curl"), "{https}");
        let hooked =
            WebhookUrl::parse("https://hooks.example.com/services/T0KEN?k=s3cret").unwrap_err();
        assert!(
            !hooked.to_string().contains("T0KEN") && !hooked.to_string().contains("s3cret"),
            "the path and query may hold a token: {hooked}"
        );
        let creds = WebhookUrl::parse("http://user:hunter2@host/").unwrap_err();
        assert_eq!(creds, UrlError::Credentials);
        assert!(!creds.to_string().contains("hunter2"));
        assert!(matches!(
            WebhookUrl::parse("ftp://host/x"),
            Err(UrlError::Scheme { .. })
        ));
        assert!(matches!(
            WebhookUrl::parse("http://host:99999/"),
            Err(UrlError::Port { .. })
        ));
        assert!(matches!(
            WebhookUrl::parse("http:///path"),
            Err(UrlError::NoHost { .. })
        ));
        assert!(matches!(
            WebhookUrl::parse("http://host/a b"),
            Err(UrlError::Characters { .. })
        ));
        assert!(matches!(
            WebhookUrl::parse("http://host/a\r\nX-Injected: 1"),
            Err(UrlError::Characters { .. })
        ));
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line("HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(parse_status_line("HTTP/1.0 500"), Some(500));
        assert_eq!(parse_status_line("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_line("HTTP/1.1 2000 x"), None);
    }
}
