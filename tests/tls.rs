//! TLS to the upstream and the token endpoint with rustls, `upstream_ca_file`, and the egress
//! proxy from `HTTPS_PROXY`/`NO_PROXY`. One test function: the egress settings are process
//! environment, so the steps run in order in this binary of their own.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aleph_proxy::mock::{Mock, MockOptions};
use support::{client, proxy_error, Harness};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn pki() -> (String, rustls::ServerConfig) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca.pem(), server)
}

/// Terminates TLS on an ephemeral port and relays the plaintext to `backend`.
async fn tls_front(server: rustls::ServerConfig, backend: SocketAddr) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

/// A minimal CONNECT-only forward proxy that records the targets it tunnels to.
async fn connect_proxy(tunnels: Arc<Mutex<Vec<String>>>, count: Arc<AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let tunnels = tunnels.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(tcp);
                let mut line = String::new();
                if reader.read_line(&mut line).await.is_err() {
                    return;
                }
                // Skip the remaining request headers.
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let mut parts = line.split_whitespace();
                let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
                    return;
                };
                tunnels.lock().unwrap().push(target.to_string());
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    return;
                };
                let mut tcp = reader.into_inner();
                if tcp
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
            });
        }
    });
    addr
}

fn port_of(url: &str) -> SocketAddr {
    let u = url::Url::parse(url).unwrap();
    format!("127.0.0.1:{}", u.port().unwrap()).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_with_a_ca_file_and_an_egress_proxy() {
    let (ca_pem, server) = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();

    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let api_tls = tls_front(server.clone(), port_of(&mock.api_url)).await;
    let token_tls = tls_front(server, port_of(&mock.token_url)).await;
    let tls_toml = |ca: bool| {
        format!(
            "upstream = \"https://{api_tls}\"\n{}[auth]\ntoken_url = \"https://{token_tls}/oauth/token\"\n[contract]\ndefault = \"contract-123\"\n",
            if ca {
                format!("upstream_ca_file = \"{}\"\n", ca_file.display())
            } else {
                String::new()
            }
        )
    };

    // 1. Both the token endpoint and the API over TLS, trusted through upstream_ca_file.
    let h = Harness::start_proxy(mock, &tls_toml(true)).await;
    let r = client()
        .get(h.url("/tasking/products/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = h.mock.state.last_request().unwrap();
    assert!(rec.headers["authorizationtoken"]
        .to_str()
        .unwrap()
        .starts_with("Bearer mock-token-"));
    let mock = {
        let fetches = h.token_fetches();
        assert_eq!(fetches, 1);
        let m = Mock::start(MockOptions::default()).await.unwrap();
        drop(h);
        m
    };

    // 1b. A server that offers h2 by ALPN: every request shares one HTTP/2 connection, also
    // when the first requests come as a burst, before any connection exists.
    let (ca_pem, mut server) = pki();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let h2_ca = dir.path().join("h2-ca.pem");
    std::fs::write(&h2_ca, &ca_pem).unwrap();
    let api_h2 = tls_front(server, port_of(&mock.api_url)).await;
    let toml = format!(
        "upstream = \"https://{api_h2}\"\nupstream_ca_file = \"{}\"\n[contract]\ndefault = \"contract-123\"\n",
        h2_ca.display()
    );
    let h = Harness::start_proxy(mock, &toml).await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        let url = h.url(&format!("/echo/h2/{i}?q={i}"));
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .body(vec![i as u8; 70_000])
                .send()
                .await
                .unwrap();
            (r.status(), r.bytes().await.unwrap())
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(body.iter().all(|b| *b == i as u8) && body.len() == 70_000);
    }
    let recorded = h.mock.state.recorded();
    let echoes: Vec<_> = recorded
        .iter()
        .filter(|r| r.uri.path().starts_with("/echo/h2/"))
        .collect();
    assert_eq!(echoes.len(), 20);
    assert!(echoes
        .iter()
        .all(|r| r.version == axum::http::Version::HTTP_2));
    // The proxy's fields reach an HTTP/2 upstream as they reach an HTTP/1.1 one: once each.
    for r in &echoes {
        let token: Vec<_> = r.headers.get_all("authorizationtoken").iter().collect();
        assert_eq!(token.len(), 1);
        assert!(token[0].to_str().unwrap().starts_with("Bearer mock-token-"));
        assert_eq!(r.headers["x-satellogic-contract-id"], "contract-123");
        assert_eq!(r.headers.get_all("x-request-id").iter().count(), 1);
    }
    assert_eq!(
        h.mock.state.api_connections.load(Ordering::SeqCst),
        1,
        "concurrent HTTP/2 requests share the one upstream connection"
    );
    let r = c.get(h.url("/tasking/products/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h.mock.state.api_connections.load(Ordering::SeqCst), 1);
    let mock = {
        let m = Mock::start(MockOptions::default()).await.unwrap();
        drop(h);
        m
    };

    // 2. Without the CA the certificate is not trusted: no token, nothing sent.
    let api_tls_2 = tls_front(pki().1, port_of(&mock.api_url)).await;
    let toml = format!(
        "upstream = \"https://{api_tls_2}\"\n[auth]\nmode = \"legacy\"\n[contract]\ndefault = \"contract-123\"\n"
    );
    let h = Harness::start_proxy(mock, &toml).await;
    let r = client()
        .get(h.url("/tasking/products/"))
        .send()
        .await
        .unwrap();
    let (status, code) = proxy_error(r).await;
    assert_eq!((status, code.as_str()), (502, "upstream_unreachable"));
    assert_eq!(h.mock.state.api_requests.load(Ordering::SeqCst), 0);
    drop(h);

    // 3. HTTPS_PROXY: the upstream connection goes through a CONNECT tunnel.
    let tunnels = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicU64::new(0));
    let egress = connect_proxy(tunnels.clone(), count.clone()).await;
    let (ca_pem, server) = pki();
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let api_tls = tls_front(server, port_of(&mock.api_url)).await;
    let toml = format!(
        "upstream = \"https://{api_tls}\"\nupstream_ca_file = \"{}\"\n[contract]\ndefault = \"contract-123\"\n",
        ca_file.display()
    );
    std::env::set_var("HTTPS_PROXY", format!("http://{egress}"));
    std::env::remove_var("NO_PROXY");
    std::env::remove_var("no_proxy");
    let h = Harness::start_proxy(mock, &toml).await;
    for _ in 0..3 {
        let r = client()
            .get(h.url("/tasking/products/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        tunnels.lock().unwrap().as_slice(),
        [api_tls.to_string()],
        "one pooled tunnel to the upstream"
    );
    drop(h);

    // 4. NO_PROXY exempts the upstream host.
    std::env::set_var("NO_PROXY", "127.0.0.1");
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let (ca_pem, server) = pki();
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let api_tls = tls_front(server, port_of(&mock.api_url)).await;
    let toml = format!(
        "upstream = \"https://{api_tls}\"\nupstream_ca_file = \"{}\"\n[contract]\ndefault = \"contract-123\"\n",
        ca_file.display()
    );
    let h = Harness::start_proxy(mock, &toml).await;
    let r = client()
        .get(h.url("/tasking/products/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(count.load(Ordering::SeqCst), 1, "NO_PROXY was not honoured");
    std::env::remove_var("HTTPS_PROXY");
    std::env::remove_var("NO_PROXY");
}
