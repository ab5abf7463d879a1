//! The webhook against strangers on the network: a slow body is cut off, a flood of connections cannot hold
//! more than the cap (the rest are closed at once), and the webhook answers again once they are gone.

use flotilla_hub::git::Follower;
use flotilla_hub::server::{Hub, Options};
use flotilla_hub::store::MemStore;
use flotilla_hub::webhook::{serve, BODY_DEADLINE, MAX_CONNECTIONS};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    // A flood of connections that send headers and then nothing more.
    let held = tokio::task::spawn_blocking(move || {
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 40 {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let _ = s.write_all(post_headers(10).as_bytes());
            held.push(s);
        }
        // Those past the cap are closed at once.
        std::thread::sleep(Duration::from_secs(1));
        let mut closed = 0;
        for s in &mut held {
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 1];
            match s.read(&mut buf) {
                Ok(0) => closed += 1,
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => closed += 1,
                _ => {}
            }
        }
        (held, closed)
    });
    let (held, closed) = held.await.unwrap();
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
