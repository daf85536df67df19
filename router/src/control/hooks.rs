//! Wake and sleep actuators: an HTTP(S) webhook (POST with a JSON body and
//! an optional bearer token) or a command (no shell), each under a timeout.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use stoke_config::{Hook, HookUrl};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::net::client::MAX_RESPONSE_BYTES;

/// What a hook is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start the pool's replicas.
    Wake,
    /// Stop the pool's replicas.
    Sleep,
}

impl Action {
    /// `"wake"` or `"sleep"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Wake => "wake",
            Action::Sleep => "sleep",
        }
    }
}

/// Why a hook call failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The call took longer than the hook's timeout.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The webhook could not be reached or answered badly.
    #[error("{0}")]
    Http(String),
    /// The webhook answered with a non-2xx status.
    #[error("answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Start of the answer's body.
        body: String,
    },
    /// The command could not run or exited non-zero.
    #[error("{0}")]
    Command(String),
}

/// Call `hook` for `action` on `pool`, from the edge at `edge`.
pub async fn call(hook: &Hook, action: Action, pool: &str, edge: &str, reason: &str) -> Result<(), HookError> {
    let timeout = hook.timeout();
    let run = async {
        match hook {
            Hook::Http { url, token_env, .. } => {
                let token = token_env.as_deref().and_then(|v| std::env::var(v).ok());
                let body = serde_json::json!({"pool": pool, "edge": edge, "action": action.as_str(), "reason": reason});
                post(url, token.as_deref(), Bytes::from(body.to_string())).await
            }
            Hook::Command { argv, .. } => command(argv, action, pool, edge, reason).await,
        }
    };
    tokio::time::timeout(timeout, run).await.unwrap_or(Err(HookError::Timeout(timeout)))
}

async fn post(url: &HookUrl, token: Option<&str>, body: Bytes) -> Result<(), HookError> {
    let addr = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| HookError::Http(format!("cannot resolve {}: {e}", url.host)))?
        .next()
        .ok_or_else(|| HookError::Http(format!("{} resolves to no address", url.host)))?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| HookError::Http(format!("connect to {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    if url.tls {
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| HookError::Http(format!("bad TLS name {}: {e}", url.host)))?;
        let tls = tls_connector()
            .connect(name, tcp)
            .await
            .map_err(|e| HookError::Http(format!("TLS to {}: {e}", url.host)))?;
        exchange(tls, url, token, body).await
    } else {
        exchange(tcp, url, token, body).await
    }
}

async fn exchange<S>(io: S, url: &HookUrl, token: Option<&str>, body: Bytes) -> Result<(), HookError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| HookError::Http(e.to_string()))?;
    let conn = tokio::spawn(conn);
    let host = if (url.tls && url.port == 443) || (!url.tls && url.port == 80) {
        url.host.clone()
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(url.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, concat!("stoke/", env!("CARGO_PKG_VERSION")));
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Full::new(body)).map_err(|e| HookError::Http(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(|e| HookError::Http(e.to_string()))?;
    let status = resp.status();
    let body =
        Limited::new(resp.into_body(), MAX_RESPONSE_BYTES).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    conn.abort();
    if status.is_success() {
        Ok(())
    } else {
        Err(HookError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        })
    }
}

async fn command(argv: &[String], action: Action, pool: &str, edge: &str, reason: &str) -> Result<(), HookError> {
    let (program, args) = argv.split_first().ok_or_else(|| HookError::Command("empty command".into()))?;
    let out = tokio::process::Command::new(program)
        .args(args)
        .env("STOKE_ACTION", action.as_str())
        .env("STOKE_POOL", pool)
        .env("STOKE_EDGE", edge)
        .env("STOKE_REASON", reason)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| HookError::Command(format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(HookError::Command(format!("{program} exited with {}: {}", out.status, stderr.trim())))
    }
}

/// A TLS client trusting the system's roots (built once).
fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONNECTOR: OnceLock<tokio_rustls::TlsConnector> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            if let Ok(certs) = pingora::tls::load_native_certs() {
                for c in certs {
                    let _ = roots.add(c);
                }
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth())
                .unwrap_or_else(|_| {
                    // The ring provider supports the default versions; this
                    // branch is unreachable in practice.
                    rustls::ClientConfig::builder()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth()
                });
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn command_hooks_get_the_pool_in_their_environment() {
        let dir = std::env::temp_dir().join(format!("stoke-hook-{}", fastrand::u64(..)));
        let out = dir.with_extension("out");
        let hook = Hook::Command {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!("echo $STOKE_ACTION $STOKE_POOL $STOKE_EDGE > {}", out.display()),
            ],
            timeout: Duration::from_secs(5),
        };
        call(&hook, Action::Wake, "fra-a", "fra", "test").await.expect("runs");
        assert_eq!(std::fs::read_to_string(&out).expect("written").trim(), "wake fra-a fra");
        let _ = std::fs::remove_file(out);
    }

    #[tokio::test]
    async fn failing_and_slow_commands_are_errors() {
        let fail = Hook::Command { argv: vec!["false".into()], timeout: Duration::from_secs(5) };
        assert!(matches!(call(&fail, Action::Sleep, "p", "e", "t").await, Err(HookError::Command(_))));
        let slow = Hook::Command { argv: vec!["sleep".into(), "5".into()], timeout: Duration::from_millis(100) };
        assert!(matches!(call(&slow, Action::Sleep, "p", "e", "t").await, Err(HookError::Timeout(_))));
        let missing = Hook::Command { argv: vec!["/nonexistent/hook".into()], timeout: Duration::from_secs(1) };
        assert!(matches!(call(&missing, Action::Wake, "p", "e", "t").await, Err(HookError::Command(_))));
    }
}
