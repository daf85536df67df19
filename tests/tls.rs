//! HTTPS: the certificate is chosen by SNI, ALPN gives HTTP/2 or HTTP/1.1,
//! and requests route the same as on the plain listener.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_sni_and_alpn() {
    logs();
    let rep = replica("fra-1").await;
    let (a_pem, a_key, a_der) = certificate(&["a.example.com"]);
    let (b_pem, b_key, b_der) = certificate(&["*.b.example.com"]);
    let text = format!(
        "[edge]\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndebug_headers = true\n\
         [[tls]]\nhosts = [\"a.example.com\"]\ncert = \"a.crt\"\nkey = \"a.key\"\n\
         [[tls]]\nhosts = [\"*.b.example.com\"]\ncert = \"b.crt\"\nkey = \"b.key\"\n\
         {LOCATIONS}{}\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\n",
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    );
    let file = ConfigFile::new(&text);
    file.write("a.crt", a_pem.as_bytes());
    file.write("a.key", a_key.as_bytes());
    file.write("b.crt", b_pem.as_bytes());
    file.write("b.key", b_key.as_bytes());
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.https.expect("https listener");
    let roots = [a_der.clone(), b_der.clone()];

    let h2 = send_tls(addr, &roots, "a.example.com", &[b"h2", b"http/1.1"], Req::chat("m").host("a.example.com")).await;
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(h2.peer_cert.as_ref(), Some(&a_der));
    assert_eq!(h2.resp.status, 200, "{}", h2.resp.text());
    assert_eq!(h2.resp.header("stoke-pool"), Some("fra-a"));

    let h1 = send_tls(addr, &roots, "x.b.example.com", &[b"http/1.1"], Req::chat("m").host("x.b.example.com")).await;
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.peer_cert.as_ref(), Some(&b_der));
    assert_eq!(h1.resp.status, 200, "{}", h1.resp.text());

    // The replica is told the client came over https.
    let (echo, _task) = echo_upstream(false).await;
    edge.shutdown().await;
    let text = text.replace(&rep.addr.to_string(), &echo.to_string());
    file.rewrite(&text);
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.https.expect("https");
    let r = send_tls(addr, &roots, "a.example.com", &[b"http/1.1"], Req::chat("m").host("a.example.com")).await;
    assert_eq!(r.resp.json()["headers"]["x-forwarded-proto"], "https");
    edge.shutdown().await;
}
