//! `easel serve`'s sockets: HTTPS and WSS with `--tls-keyfile`/`--tls-certfile`, several
//! `--listen` addresses at once, and a client that never finishes its handshake holding up nobody.

mod common;

use common::free_port;
use futures_util::StreamExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{crypto, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

struct Easel(Child);

impl Drop for Easel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A self-signed certificate for `localhost`, its PEM files, and a client that trusts it.
fn certificate(dir: &std::path::Path) -> TlsConnector {
    let signed = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("key.pem"), signed.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), signed.cert.pem()).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(signed.cert.der().to_vec())).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_stream(
    connector: &TlsConnector,
    address: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(address).await?;
    connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// `GET path` over HTTPS: the head (status line and headers) and the body.
async fn https_get(connector: &TlsConnector, address: &str, path: &str) -> std::io::Result<(String, String)> {
    let mut stream = tls_stream(connector, address).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Ok((head.to_string(), body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_and_wss_on_every_listen_address() {
    let dir = tempfile::tempdir().unwrap();
    let connector = certificate(dir.path());
    let port = free_port();
    // IPv6 too where this host has it.
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let listen = if ipv6 { "127.0.0.1,::1" } else { "127.0.0.1" };
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let _easel = Easel(
        Command::new(env!("CARGO_BIN_EXE_easel"))
            .args(["serve", "--listen", listen, "--port", &port.to_string()])
            .args(["--tls-keyfile", &path("key.pem"), "--tls-certfile", &path("cert.pem")])
            .args(["--api-key", "k3y"])
            .args(["--base-directory", &path("")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("easel starts"),
    );
    let address = format!("127.0.0.1:{port}");
    let started = Instant::now();
    while https_get(&connector, &address, "/prompt?token=k3y").await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the server never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A client that connects and says nothing does not hold up the next one.
    let _silent = TcpStream::connect(&address).await.unwrap();
    let (head, body) = https_get(&connector, &address, "/prompt?token=k3y").await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, r#"{"exec_info": {"queue_remaining": 0}}"#);
    // The key, presented once as ?token=, comes back as a cookie only sent over TLS.
    let cookie = head
        .lines()
        .find(|line| line.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_default();
    assert!(
        cookie.contains("easel_token=k3y") && cookie.contains("; Secure"),
        "{head}"
    );
    if ipv6 {
        let (head, _) = https_get(&connector, &format!("[::1]:{port}"), "/api/prompt?token=k3y")
            .await
            .unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    }

    // Plain HTTP on the TLS port gets no answer; the server keeps serving.
    let mut plain = TcpStream::connect(&address).await.unwrap();
    plain
        .write_all(b"GET /prompt HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"));

    // The WebSocket over TLS opens with the status message carrying the client's id.
    let stream = tls_stream(&connector, &address).await.unwrap();
    let (mut socket, _) = tokio_tungstenite::client_async(
        format!("wss://localhost:{port}/ws?clientId=tls-client&token=k3y"),
        stream,
    )
    .await
    .unwrap();
    let first = socket.next().await.unwrap().unwrap().into_text().unwrap();
    let status: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(status["type"], "status");
    assert_eq!(status["data"]["sid"], "tls-client");
}
