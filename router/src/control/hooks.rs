//! Wake and sleep actuators. A hook is one step or several, called in
//! order; a step is an HTTP(S) request (any method, headers and a body
//! template, a bearer token from the environment or a file, its own CAs)
//! or a command (no shell), each under its own timeout. A hook whose
//! steps name `{replica}` is called for every replica at once.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use stoke_config::{Hook, HookStep, HookToken, HookUrl, HookVar, HttpStep};
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

/// How deep a sleep a hook call is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// The replicas keep running with their model out of GPU memory
    /// (vLLM's sleep mode).
    Light,
    /// The replicas are stopped (scale to zero).
    Deep,
}

impl Depth {
    /// `"light"` or `"deep"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Depth::Light => "light",
            Depth::Deep => "deep",
        }
    }
}

/// One call of a hook: what it is asked to do, and what its templates may
/// name.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    /// Wake or sleep.
    pub action: Action,
    /// The pool's id.
    pub pool: &'a str,
    /// The calling edge's location.
    pub edge: &'a str,
    /// Why (`request`, `demand`, `prewarm`, `idle`).
    pub reason: &'a str,
    /// How many replicas the pool is to have.
    pub replicas: u32,
    /// How deep a sleep the call is for (or wakes from).
    pub depth: Depth,
    /// The pool's replicas (`host:port`), for hooks that name `{replica}`.
    pub replica_addrs: &'a [Arc<str>],
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
    /// A step of several failed.
    #[error("step {step} of {of}: {error}")]
    Step {
        /// Which step (from 1).
        step: usize,
        /// How many there are.
        of: usize,
        /// Its failure.
        error: Box<HookError>,
    },
    /// The call for one replica failed.
    #[error("replica {replica}: {error}")]
    Replica {
        /// The replica.
        replica: Arc<str>,
        /// Its failure.
        error: Box<HookError>,
    },
}

/// Call `hook` as `call` says: its steps in order, each under its own
/// timeout, once (or once per replica, at the same time, when a step names
/// `{replica}`; then every replica's call must succeed).
pub async fn call(hook: &Hook, call: &Call<'_>) -> Result<(), HookError> {
    if !hook.per_replica() {
        return steps(hook, call, "").await;
    }
    let each = call.replica_addrs.iter().map(|r| async move {
        steps(hook, call, r).await.map_err(|e| HookError::Replica { replica: r.clone(), error: Box::new(e) })
    });
    futures_util::future::join_all(each).await.into_iter().collect()
}

/// Call a hook whose steps name `{replica}` for each of the call's
/// replicas at once: each replica's own outcome.
pub async fn call_each(hook: &Hook, call: &Call<'_>) -> Vec<(Arc<str>, Result<(), HookError>)> {
    let each = call.replica_addrs.iter().map(|r| async move { (r.clone(), steps(hook, call, r).await) });
    futures_util::future::join_all(each).await
}

async fn steps(hook: &Hook, call: &Call<'_>, replica: &str) -> Result<(), HookError> {
    let vars = Vars { call, replicas: call.replicas.to_string(), replica };
    let of = hook.steps.len();
    for (i, step) in hook.steps.iter().enumerate() {
        let timeout = step.timeout();
        let run = async {
            match step {
                HookStep::Http(h) => http_step(h, &vars).await,
                HookStep::Command { argv, .. } => command(argv, &vars).await,
            }
        };
        let result = tokio::time::timeout(timeout, run).await.unwrap_or(Err(HookError::Timeout(timeout)));
        match result {
            Ok(()) => {}
            Err(e) if of == 1 => return Err(e),
            Err(e) => return Err(HookError::Step { step: i + 1, of, error: Box::new(e) }),
        }
    }
    Ok(())
}

/// The values a call's templates are filled in with.
struct Vars<'a> {
    call: &'a Call<'a>,
    replicas: String,
    replica: &'a str,
}

impl Vars<'_> {
    fn get(&self, var: HookVar) -> &str {
        match var {
            HookVar::Pool => self.call.pool,
            HookVar::Edge => self.call.edge,
            HookVar::Action => self.call.action.as_str(),
            HookVar::Reason => self.call.reason,
            HookVar::Replicas => &self.replicas,
            HookVar::Depth => self.call.depth.as_str(),
            HookVar::Replica => self.replica,
        }
    }

    /// stoke's own JSON body, sent by a step that writes none.
    fn default_body(&self) -> String {
        let c = self.call;
        let mut body = serde_json::json!({
            "pool": c.pool,
            "edge": c.edge,
            "action": c.action.as_str(),
            "reason": c.reason,
            "replicas": c.replicas,
            "depth": c.depth.as_str(),
        });
        if !self.replica.is_empty() {
            body["replica"] = self.replica.into();
        }
        body.to_string()
    }
}

async fn http_step(step: &HttpStep, vars: &Vars<'_>) -> Result<(), HookError> {
    let raw = step.url.render(|v| vars.get(v));
    let url = HookUrl::parse(&raw).map_err(HookError::Http)?;
    let method = Method::from_bytes(step.method.as_bytes()).map_err(|e| HookError::Http(e.to_string()))?;
    let body = match &step.body {
        Some(t) => Some(t.render(|v| vars.get(v))),
        None if matches!(method, Method::POST | Method::PUT | Method::PATCH) => Some(vars.default_body()),
        None => None,
    };
    let token = match &step.token {
        None => None,
        Some(HookToken::Env(name)) => std::env::var(name).ok(),
        Some(HookToken::File(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| HookError::Http(format!("token_file {}: {e}", path.display())))?
                .trim()
                .to_owned(),
        ),
    };
    let mut req = Request::builder()
        .method(method)
        .uri(url.path.as_str())
        .header(http::header::HOST, host_header(&url))
        .header(http::header::USER_AGENT, concat!("stoke/", env!("CARGO_PKG_VERSION")));
    let mut typed = false;
    for (name, value) in &step.headers {
        typed |= name == "content-type";
        req = req.header(name.as_str(), value.render(|v| vars.get(v)));
    }
    if body.is_some() && !typed {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    if let Some(t) = token {
        req = match &step.token_header {
            None => req.header(http::header::AUTHORIZATION, format!("Bearer {t}")),
            Some(name) => req.header(name.as_str(), t),
        };
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| HookError::Http(e.to_string()))?;
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
        let connector = match &step.ca_file {
            None => tls_connector(),
            Some(path) => connector_trusting(path)?,
        };
        let tls =
            connector.connect(name, tcp).await.map_err(|e| HookError::Http(format!("TLS to {}: {e}", url.host)))?;
        exchange(tls, req).await
    } else {
        exchange(tcp, req).await
    }
}

fn host_header(url: &HookUrl) -> String {
    let host = if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.clone() };
    if (url.tls && url.port == 443) || (!url.tls && url.port == 80) {
        host
    } else {
        format!("{host}:{}", url.port)
    }
}

async fn exchange<S>(io: S, req: Request<Full<Bytes>>) -> Result<(), HookError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| HookError::Http(e.to_string()))?;
    let conn = tokio::spawn(conn);
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

async fn command(argv: &[stoke_config::Template], vars: &Vars<'_>) -> Result<(), HookError> {
    let argv: Vec<String> = argv.iter().map(|a| a.render(|v| vars.get(v))).collect();
    let (program, args) = argv.split_first().ok_or_else(|| HookError::Command("empty command".into()))?;
    let c = vars.call;
    let out = tokio::process::Command::new(program)
        .args(args)
        .env("STOKE_ACTION", c.action.as_str())
        .env("STOKE_POOL", c.pool)
        .env("STOKE_EDGE", c.edge)
        .env("STOKE_REASON", c.reason)
        .env("STOKE_REPLICAS", &vars.replicas)
        .env("STOKE_DEPTH", c.depth.as_str())
        .env("STOKE_REPLICA", vars.replica)
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

/// A TLS client trusting only the CAs in the PEM file at `path` (read at
/// each call: the file may be rotated).
fn connector_trusting(path: &std::path::Path) -> Result<tokio_rustls::TlsConnector, HookError> {
    use rustls::pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|e| HookError::Http(format!("ca_file {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| HookError::Http(format!("ca_file {}: {e}", path.display())))?;
        roots.add(cert).map_err(|e| HookError::Http(format!("ca_file {}: {e}", path.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HookError::Http(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
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
    use std::path::Path;
    use std::sync::Mutex;
    use std::time::Duration;

    use hyper::service::service_fn;

    /// One request as a recorder saw it.
    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        uri: String,
        headers: http::HeaderMap,
        body: String,
    }

    /// A loopback HTTP server that records every request and answers
    /// `status(request)`; with `tls`, it serves that certificate.
    async fn recorder(
        status: fn(&Seen) -> u16,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> (std::net::SocketAddr, Arc<Mutex<Vec<Seen>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (log, tls) = (log.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let seen = Seen {
                                method: parts.method.to_string(),
                                uri: parts.uri.to_string(),
                                headers: parts.headers,
                                body: String::from_utf8_lossy(&body).into_owned(),
                            };
                            let code = status(&seen);
                            log.lock().expect("log").push(seen);
                            let resp = http::Response::builder().status(code).body(Full::new(Bytes::from("{}")));
                            Ok::<_, std::convert::Infallible>(resp.expect("response"))
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => drop(http.serve_connection(TokioIo::new(tcp), svc).await),
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                drop(http.serve_connection(TokioIo::new(tls), svc).await);
                            }
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    fn ok(_: &Seen) -> u16 {
        200
    }

    /// The wake and sleep hooks of a pool written as `scale` (a
    /// `[pool.scale]` body), compiled from a config file in `dir`.
    fn hooks_of(dir: &Path, scale: &str) -> (Hook, Option<Hook>) {
        let text = format!(
            "[edge]\nlocation = \"fra\"\n[[location]]\nid = \"fra\"\nlat = 1.0\nlon = 2.0\n\
             [[pool]]\nid = \"fra-gpu\"\nlocation = \"fra\"\nserves = [\"m\"]\nreplicas = [\"127.0.0.1:1\"]\n\
             [pool.scale]\n{scale}\n[[route]]\nservice = \"m\"\n"
        );
        let network = stoke_config::load_str(&text, &dir.join("stoke.toml")).expect("valid config");
        let scale = network.pools[0].scale.clone().expect("scale");
        (scale.wake, scale.sleep)
    }

    fn wake_call<'a>(replicas: &'a [Arc<str>]) -> Call<'a> {
        Call {
            action: Action::Wake,
            pool: "fra-gpu",
            edge: "fra",
            reason: "request",
            replicas: replicas.len() as u32,
            depth: Depth::Deep,
            replica_addrs: replicas,
        }
    }

    fn temp_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("stoke-hooks-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[tokio::test]
    async fn a_kubernetes_scale_patch_is_sent_as_written_with_the_token_from_its_file() {
        let (addr, seen) = recorder(ok, None).await;
        let dir = temp_dir();
        std::fs::write(dir.join("token"), "sa-token-1\n").expect("token");
        let (wake, sleep) = hooks_of(
            &dir,
            &format!(
                "wake = {{ url = \"http://{addr}/apis/apps/v1/namespaces/gpu/deployments/{{pool}}/scale\", method = \"patch\", \
                 headers = {{ Content-Type = \"application/merge-patch+json\" }}, \
                 body = '{{\"spec\":{{\"replicas\":{{replicas}}}}}}', token_file = \"token\" }}\n\
                 sleep = {{ url = \"http://{addr}/pools/{{pool}}/{{action}}\" }}"
            ),
        );
        let replicas: Vec<Arc<str>> = vec!["10.0.0.1:8000".into(), "10.0.0.2:8000".into()];
        call(&wake, &wake_call(&replicas)).await.expect("wake");
        // The token file is read at each call: a rotated token is sent.
        std::fs::write(dir.join("token"), "sa-token-2").expect("token");
        call(&wake, &wake_call(&replicas)).await.expect("wake");
        let sleep = sleep.expect("sleep hook");
        let what = Call { action: Action::Sleep, reason: "idle", replicas: 0, ..wake_call(&replicas) };
        call(&sleep, &what).await.expect("sleep");

        let seen = seen.lock().expect("log").clone();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].method, "PATCH");
        assert_eq!(seen[0].uri, "/apis/apps/v1/namespaces/gpu/deployments/fra-gpu/scale");
        assert_eq!(seen[0].headers["content-type"], "application/merge-patch+json");
        assert_eq!(seen[0].headers["authorization"], "Bearer sa-token-1");
        assert_eq!(seen[0].body, r#"{"spec":{"replicas":2}}"#);
        assert_eq!(seen[1].headers["authorization"], "Bearer sa-token-2");
        // Without a body template, a POST carries stoke's JSON.
        assert_eq!((seen[2].method.as_str(), seen[2].uri.as_str()), ("POST", "/pools/fra-gpu/sleep"));
        assert_eq!(seen[2].headers["content-type"], "application/json");
        let body: serde_json::Value = serde_json::from_str(&seen[2].body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"pool": "fra-gpu", "edge": "fra", "action": "sleep", "reason": "idle", "replicas": 0, "depth": "deep"})
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn steps_run_in_order_per_replica_and_the_first_failure_ends_them() {
        // vLLM's level-2 wake on each replica: wake the weights, reload
        // them, then the KV cache.
        let (a, seen_a) = recorder(ok, None).await;
        let (b, seen_b) = recorder(ok, None).await;
        let dir = temp_dir();
        let (wake, _) = hooks_of(
            &dir,
            "wake = { steps = [\n\
               { url = \"http://{replica}/wake_up?tags=weights\" },\n\
               { url = \"http://{replica}/collective_rpc\", body = '{\"method\":\"reload_weights\"}' },\n\
               { url = \"http://{replica}/wake_up?tags=kv_cache\", timeout = \"30s\" },\n\
             ] }",
        );
        assert!(wake.per_replica());
        assert_eq!(wake.steps[2].timeout(), Duration::from_secs(30), "each step has its own timeout");
        let replicas: Vec<Arc<str>> = vec![a.to_string().into(), b.to_string().into()];
        call(&wake, &wake_call(&replicas)).await.expect("both replicas wake");
        for seen in [&seen_a, &seen_b] {
            let seen = seen.lock().expect("log");
            let uris: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
            assert_eq!(uris, ["/wake_up?tags=weights", "/collective_rpc", "/wake_up?tags=kv_cache"]);
            assert_eq!(seen[1].body, r#"{"method":"reload_weights"}"#);
            // A step without a body template still says which replica.
            assert!(seen[0].body.contains(r#""replica":"127.0.0.1:"#), "{}", seen[0].body);
        }

        // A replica that refuses the reload: its steps stop there, and the
        // hook fails naming it.
        let (bad, seen_bad) = recorder(|s| if s.uri.starts_with("/collective_rpc") { 503 } else { 200 }, None).await;
        let replicas: Vec<Arc<str>> = vec![a.to_string().into(), bad.to_string().into()];
        let err = call(&wake, &wake_call(&replicas)).await.expect_err("one replica fails");
        let text = err.to_string();
        assert!(text.contains(&format!("replica {bad}")) && text.contains("step 2 of 3: answered 503"), "{text}");
        let uris: Vec<String> = seen_bad.lock().expect("log").iter().map(|s| s.uri.clone()).collect();
        assert_eq!(uris, ["/wake_up?tags=weights", "/collective_rpc"], "no step after the failed one");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_token_header_and_a_ca_file_are_honoured() {
        let (cert_pem, key_pem) = {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
            (ck.cert.pem(), ck.signing_key.serialize_pem())
        };
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("cert");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        let (addr, seen) = recorder(ok, Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))).await;
        let dir = temp_dir();
        std::fs::write(dir.join("ca.pem"), &cert_pem).expect("ca");
        let var = format!("STOKE_TEST_NOMAD_{}", fastrand::u32(..));
        std::env::set_var(&var, "nomad-secret");
        let (wake, _) = hooks_of(
            &dir,
            &format!(
                "wake = {{ url = \"https://localhost:{}/v1/job/llm/scale\", ca_file = \"ca.pem\", \
                 token_env = \"{var}\", token_header = \"X-Nomad-Token\", \
                 body = '{{\"Count\":{{replicas}},\"Target\":{{\"Group\":\"{{pool}}\"}},\"Message\":\"stoke {{reason}}\"}}' }}",
                addr.port()
            ),
        );
        let replicas: Vec<Arc<str>> = vec!["10.0.0.1:8000".into()];
        call(&wake, &wake_call(&replicas)).await.expect("wake over TLS trusting ca.pem");
        let seen = seen.lock().expect("log").clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].headers["x-nomad-token"], "nomad-secret");
        assert!(!seen[0].headers.contains_key("authorization"));
        assert_eq!(seen[0].body, r#"{"Count":1,"Target":{"Group":"fra-gpu"},"Message":"stoke request"}"#);
        // The same URL without the CA file: the system's roots do not
        // trust the certificate.
        let (untrusting, _) =
            hooks_of(&dir, &format!("wake = {{ url = \"https://localhost:{}/v1/job/llm/scale\" }}", addr.port()));
        let err = call(&untrusting, &wake_call(&replicas)).await.expect_err("untrusted");
        assert!(err.to_string().contains("TLS to localhost"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn command_hooks_get_the_call_in_their_arguments_and_environment() {
        let dir = temp_dir();
        let out = dir.join("out");
        let (wake, _) = hooks_of(
            &dir,
            &format!(
                "wake = {{ command = [\"sh\", \"-c\", \"echo $0 $STOKE_ACTION $STOKE_POOL $STOKE_EDGE $STOKE_REPLICAS $STOKE_DEPTH > {}\", \"--replicas={{replicas}}\"] }}",
                out.display()
            ),
        );
        let replicas: Vec<Arc<str>> = vec!["a:1".into(), "b:1".into(), "c:1".into()];
        call(&wake, &wake_call(&replicas)).await.expect("runs");
        assert_eq!(std::fs::read_to_string(&out).expect("written").trim(), "--replicas=3 wake fra-gpu fra 3 deep");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn failing_and_slow_commands_are_errors() {
        let dir = temp_dir();
        let replicas: Vec<Arc<str>> = vec![];
        let (fail, _) = hooks_of(&dir, "wake = { command = [\"false\"] }");
        assert!(matches!(call(&fail, &wake_call(&replicas)).await, Err(HookError::Command(_))));
        let (slow, _) = hooks_of(&dir, "wake = { command = [\"sleep\", \"5\"], timeout = \"100ms\" }");
        assert!(matches!(call(&slow, &wake_call(&replicas)).await, Err(HookError::Timeout(_))));
        let (missing, _) = hooks_of(&dir, "wake = { command = [\"/nonexistent/hook\"] }");
        assert!(matches!(call(&missing, &wake_call(&replicas)).await, Err(HookError::Command(_))));
        let _ = std::fs::remove_dir_all(dir);
    }
}
