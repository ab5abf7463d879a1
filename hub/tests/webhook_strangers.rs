//! The webhook against strangers on the network: a slow body is cut off, a flood of connections cannot hold
//! more than the cap (the rest are closed at once), and the webhook answers again once they are gone.

use flotilla_hub::git::Follower;
use flotilla_hub::server::{Hub, Options};
use flotilla_hub::store::MemStore;
use flotilla_hub::webhook::{serve, BODY_DEADLINE, MAX_CONNECTIONS};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

async fn webhook() -> (std::net::SocketAddr, CancellationToken) {
    let store = Arc::new(MemStore::default());
    let follower =
        Follower::new("file:///nonexistent".to_string(), "main", std::env::temp_dir().join("flotilla-unused"));
    let shutdown = CancellationToken::new();
    let opts = Options { tick: None, ..Options::default() };
    let hub = Hub::with_options(store, follower, shutdown.clone(), opts).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(hub, listener, None, "main".into()));
    (addr, shutdown)
}

/// The i-th of many loopback source addresses (all of 127.0.0.0/8 is this machine).
fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1 + (i / 250) as u8, 0, 2 + (i % 250) as u8)
}

async fn connect_from(src: Ipv4Addr, addr: SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((src, 0).into()).unwrap();
    sock.connect(addr).await.unwrap()
}

fn is_closed(s: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match s.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// One whole request from `src`; the status line's code.
async fn request_from(src: Ipv4Addr, addr: SocketAddr) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut s = connect_from(src, addr).await;
    let body = "{}";
    let req = format!("{}{body}", post_headers(body.len()).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n"));
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn post_headers(content_length: usize) -> String {
    format!("POST /hooks/git HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_cut_off_and_a_flood_cannot_hold_more_than_the_cap() {
    let (addr, shutdown) = webhook().await;
    // Headers, then one byte: the body never completes.
    let slow = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(BODY_DEADLINE + Duration::from_secs(10))).unwrap();
        s.write_all(post_headers(100).as_bytes()).unwrap();
        s.write_all(b"{").unwrap();
        let started = Instant::now();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        (started.elapsed(), out)
    });
    // A flood of connections from many sources (one each) that send headers and then nothing more.
    let mut held = Vec::new();
    for i in 0..MAX_CONNECTIONS + 40 {
        let mut s = connect_from(source(i), addr).await;
        let _ = s.write_all(post_headers(10).as_bytes()).await;
        held.push(s);
    }
    let held = async move {
        // Those past the cap are closed at once.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let closed = held.iter().filter(|s| is_closed(s)).count();
        (held, closed)
    };
    let (held, closed) = held.await;
    assert!(closed >= 40, "{closed} of the connections past the cap of {MAX_CONNECTIONS} were closed at once");
    let (took, answer) = slow.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("the body did not arrive within 10 s"), "{answer}");
    assert!(took < BODY_DEADLINE + Duration::from_secs(5), "cut off after {took:?}");
    // Once the flood is gone, the webhook answers again.
    drop(held);
    let ok = tokio::task::spawn_blocking(move || {
        for _ in 0..50 {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let body = "{}";
            let _ = s.write_all(format!("{}{body}", post_headers(body.len())).as_bytes());
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 ") && !out.is_empty() {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        String::new()
    })
    .await
    .unwrap();
    assert!(ok.starts_with("HTTP/1.1 400") || ok.starts_with("HTTP/1.1 200"), "an ordinary request is answered: {ok}");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_can_hold_few_connections_and_make_few_requests_while_others_are_served() {
    let (addr, shutdown) = webhook().await;
    let greedy = Ipv4Addr::new(127, 9, 9, 9);
    let limits = flotilla_hub::limits::SourceLimits::default();
    let mut held = Vec::new();
    for _ in 0..limits.connections + 10 {
        let mut s = connect_from(greedy, addr).await;
        let _ = s.write_all(post_headers(10).as_bytes()).await;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let closed = held.iter().filter(|s| is_closed(s)).count();
    assert!(closed >= 10, "{closed} closed: one source holds at most {} connections", limits.connections);
    drop(held);
    // Requests as fast as it can: after its burst, 429 (or closed at once); another source is answered.
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..(limits.burst as usize + 20) {
        *codes.entry(request_from(greedy, addr).await).or_insert(0) += 1;
    }
    assert!(codes.keys().any(|c| *c == 429 || *c == 0), "the greedy source is limited: {codes:?}");
    assert!(codes.get(&400).copied().unwrap_or(0) <= limits.burst as usize + 5, "{codes:?}");
    assert_eq!(request_from(Ipv4Addr::new(127, 8, 8, 8), addr).await, 400, "another source is served");
    shutdown.cancel();
}
