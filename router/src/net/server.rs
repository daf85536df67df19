//! A minimal HTTP/1.1 + HTTP/2 server loop (hyper) for the admin API and
//! the simulator. Connections are tasks owned by the loop, so that ending
//! the loop's task ends every connection at once.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A response body: all at once, or streamed through a channel.
pub type HttpBody = Either<Full<Bytes>, http_body_util::channel::Channel<Bytes, Infallible>>;

/// Serve `handler` on `listener` until `shutdown` turns true; then stop
/// accepting and let open connections finish.
pub async fn serve_http<F, Fut>(listener: TcpListener, shutdown: watch::Receiver<bool>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<HttpBody>, Infallible>> + Send + 'static,
{
    serve(listener, shutdown, handler, None, false).await;
}

/// Serve `handler` on `listener`, counting accepted connections in
/// `counter`, until `shutdown` turns true; then close every connection at
/// once (as a crashed process would) and return once all are closed.
pub async fn serve_http_counted<F, Fut>(
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
    handler: F,
    counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<HttpBody>, Infallible>> + Send + 'static,
{
    serve(listener, shutdown, handler, counter, true).await;
}

async fn serve<F, Fut>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    handler: F,
    counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    abort: bool,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<HttpBody>, Infallible>> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        if let Some(n) = &counter {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let handler = handler.clone();
        conns.spawn(async move {
            let service = service_fn(&handler);
            let _ = Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
        });
    }
    drop(listener);
    if abort {
        conns.shutdown().await;
    }
    while conns.join_next().await.is_some() {}
}

/// A response with a text body.
pub fn text(status: http::StatusCode, body: &str) -> Response<HttpBody> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::copy_from_slice(body.as_bytes()))));
    *r.status_mut() = status;
    r
}

/// A response with a JSON body.
pub fn json(status: http::StatusCode, v: &serde_json::Value) -> Response<HttpBody> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(v.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}
