//! The hub's store on a real etcd (Debian's etcd-server, a process on loopback ports): the store contract, values
//! and batches beyond etcd's limits, a batch left half-applied by a dying leader, prefixes that keep fleets
//! apart, and fencing: once another replica leads, the old leader's writes fail.

#[cfg(not(feature = "etcd"))]
#[test]
#[ignore = "needs the hub's etcd feature (protoc to build it): scripts/test.sh runs these with --features flotilla-hub/etcd"]
fn the_hub_was_built_without_etcd() {}

#[cfg(feature = "etcd")]
mod on_etcd {
    use flotilla_hub::etcd::{EtcdConfig, EtcdStore};
    use flotilla_hub::leader;
    use flotilla_hub::store::{Batch, Store};
    use std::time::{Duration, Instant};
    use tokio_util::sync::CancellationToken;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_contract_on_etcd_with_values_and_batches_beyond_its_limits() {
        let etcd = flotilla_e2e::etcd::Etcd::start();
        let cfg = EtcdConfig::parse(&etcd.url(), "/flotilla/a", None).unwrap();
        let other = EtcdConfig::parse(&etcd.url(), "/flotilla/b", None).unwrap();
        let (a, b) = tokio::task::spawn_blocking(move || {
            (EtcdStore::open(&cfg, None).unwrap(), EtcdStore::open(&other, None).unwrap())
        })
        .await
        .unwrap();
        tokio::task::spawn_blocking(move || {
            a.commit(Batch::default().put("clusters/eu-1", "x").put("clusters/eu-2", "y").put("other", "z")).unwrap();
            assert_eq!(a.get("clusters/eu-1").unwrap().as_deref(), Some(&b"x"[..]));
            assert_eq!(a.keys("clusters/").unwrap(), vec!["clusters/eu-1", "clusters/eu-2"]);
            assert!(b.scan("").unwrap().is_empty(), "another fleet's prefix sees nothing of this one");
            a.commit(Batch::default().delete("clusters/eu-1")).unwrap();
            assert_eq!(a.get("clusters/eu-1").unwrap(), None);
            // A batch naming a key twice (etcd refuses such a transaction): the last operation counts.
            a.commit(Batch::default().put("clusters/eu-3", "first").put("other", "w").put("clusters/eu-3", "last"))
                .unwrap();
            assert_eq!(a.get("clusters/eu-3").unwrap().as_deref(), Some(&b"last"[..]));
            a.commit(Batch::default().put("clusters/eu-3", "again").delete("clusters/eu-3")).unwrap();
            assert_eq!(a.get("clusters/eu-3").unwrap(), None);

            // A value of 3 MiB (etcd takes at most 1.5 MiB per request): chunked, read back whole.
            let big: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
            a.commit(Batch::default().put("bundles/sha256:big", big.clone())).unwrap();
            assert_eq!(a.get("bundles/sha256:big").unwrap().as_deref(), Some(&big[..]));
            assert_eq!(a.scan("bundles/").unwrap()[0].1, big);
            // Overwritten and deleted: its chunks are collected.
            a.commit(Batch::default().delete("bundles/sha256:big")).unwrap();
            assert_eq!(a.collect_garbage().unwrap(), 1);

            // A batch of 5,000 operations (etcd allows 128 per transaction): all of it.
            let mut batch = Batch::default();
            for i in 0..5000 {
                batch = batch.put(format!("desired/c-{i:05}"), format!("digest-{i}"));
            }
            let started = Instant::now();
            a.commit(batch).unwrap();
            eprintln!("a batch of 5,000 keys committed in {:.2} s", started.elapsed().as_secs_f64());
            assert_eq!(a.keys("desired/").unwrap().len(), 5000);
            // Reads of more than one message's worth: 40 values of 800 KiB (32 MB) under one prefix, read in pages.
            let mut wide = Batch::default();
            for i in 0..40 {
                wide = wide.put(format!("wide/{i:02}"), vec![b'w'; 800 << 10]);
            }
            a.commit(wide).unwrap();
            let read = a.scan("wide/").unwrap();
            assert_eq!(read.len(), 40);
            assert!(read.iter().all(|(_, v)| v.len() == 800 << 10));
            let (keys, bytes) = a.size().unwrap();
            eprintln!("store size: {keys} keys, {bytes} bytes");
            let families = a.sizes().unwrap();
            assert_eq!(families["wide"].0, 40);
            assert!(families["wide"].1 >= 40 * (800 << 10), "{families:?}");
            assert_eq!(families["desired"].0, 5000, "{families:?}");
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_a_dying_leader_left_half_applied_is_seen_whole_and_rolled_forward() {
        let etcd = flotilla_e2e::etcd::Etcd::start();
        let cfg = EtcdConfig::parse(&etcd.url(), "/flotilla/j", None).unwrap();
        let c = cfg.clone();
        tokio::task::spawn_blocking(move || {
            let dying = EtcdStore::open(&c, None).unwrap();
            let mut batch = Batch::default().delete("old");
            dying.commit(Batch::default().put("old", "1")).unwrap();
            for i in 0..300 {
                batch = batch.put(format!("k/{i:03}"), vec![b'v'; 10]);
            }
            // The journal is written and flipped; the leader dies before applying any key.
            dying.commit_journal_only(batch).unwrap();
            let reader = EtcdStore::open_without_recovery(&c).unwrap();
            assert_eq!(reader.keys("k/").unwrap().len(), 300, "visible whole from the flip");
            assert_eq!(reader.get("old").unwrap(), None);
            // The next leader rolls it forward before anything else.
            let next = EtcdStore::open(&c, None).unwrap();
            assert_eq!(next.keys("k/").unwrap().len(), 300);
            assert!(!next.has_pending_journal().unwrap(), "the journal is gone once applied");
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deposed_leader_can_write_nothing_and_a_standby_takes_over_within_the_lease() {
        let etcd = flotilla_e2e::etcd::Etcd::start();
        let cfg = EtcdConfig::parse(&etcd.url(), "/flotilla/e", None).unwrap();
        let client = cfg.connect().await.unwrap();
        let ttl = Duration::from_secs(3);
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        let a = leader::campaign(&cfg, &client, "a", ttl, &stop_a).await.unwrap().unwrap();
        let (c2, cfg2, s2) = (client.clone(), cfg.clone(), stop_b.clone());
        let b = tokio::spawn(async move { leader::campaign(&cfg2, &c2, "b", ttl, &s2).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!b.is_finished(), "b stands by while a leads");
        let (ca, fa) = (cfg.clone(), a.fence.clone());
        let store_a = tokio::task::spawn_blocking(move || EtcdStore::open(&ca, Some(fa)).unwrap()).await.unwrap();
        let store_a = std::sync::Arc::new(store_a);
        let s = store_a.clone();
        tokio::task::spawn_blocking(move || s.commit(Batch::default().put("x", "from a")).unwrap()).await.unwrap();

        // a's lease is gone (as when its process is paused past the TTL): b leads within the lease's time.
        let mut c = client.clone();
        let started = Instant::now();
        c.lease_revoke(a.lease).await.unwrap();
        let b = tokio::time::timeout(ttl + Duration::from_secs(2), b)
            .await
            .expect("b leads in time")
            .unwrap()
            .unwrap()
            .unwrap();
        eprintln!("standby took over {:.2} s after the leader's lease ended", started.elapsed().as_secs_f64());
        assert_ne!(a.fence, b.fence);
        tokio::time::timeout(ttl + Duration::from_secs(1), a.lost.cancelled())
            .await
            .expect("a knows it lost within the TTL");

        // Every write of a fails now; b's succeed.
        let s = store_a.clone();
        let e =
            tokio::task::spawn_blocking(move || s.commit(Batch::default().put("x", "late write from a")).unwrap_err())
                .await
                .unwrap();
        assert!(flotilla_hub::hub::error_chain(&e).contains("fenced"), "{e}");
        let mut big = Batch::default();
        for i in 0..200 {
            big = big.put(format!("y/{i}"), "a");
        }
        let s = store_a.clone();
        assert!(tokio::task::spawn_blocking(move || s.commit(big).is_err()).await.unwrap(), "a large batch too");
        let (cb, fb) = (cfg.clone(), b.fence.clone());
        tokio::task::spawn_blocking(move || {
            let store_b = EtcdStore::open(&cb, Some(fb)).unwrap();
            assert_eq!(store_b.get("x").unwrap().as_deref(), Some(&b"from a"[..]), "nothing of a's late write");
            assert!(store_b.keys("y/").unwrap().is_empty());
            store_b.commit(Batch::default().put("x", "from b")).unwrap();
        })
        .await
        .unwrap();
        stop_a.cancel();
        stop_b.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_to_etcd_with_certificates_of_the_fleet_ca() {
        let tmp = tempfile::tempdir().unwrap();
        flotilla_e2e::issue_certs(tmp.path(), "c", "hub-etcd");
        let certs = tmp.path().join("certs");
        let etcd = flotilla_e2e::etcd::Etcd::start_tls(&certs);
        let read = |f: &str| std::fs::read_to_string(certs.join(f)).unwrap();
        let url = format!("etcds://127.0.0.1:{}", etcd.port);
        let tls = flotilla_hub::etcd::EtcdTls {
            ca_pem: read("ca.pem"),
            cert_pem: Some(read("operators/hub-etcd.pem")),
            key_pem: Some(read("operators/hub-etcd-key.pem")),
        };
        let with_cert = EtcdConfig::parse(&url, "/flotilla/tls", Some(tls.clone())).unwrap();
        let without_cert = EtcdConfig::parse(
            &url,
            "/flotilla/tls",
            Some(flotilla_hub::etcd::EtcdTls { cert_pem: None, key_pem: None, ..tls }),
        )
        .unwrap();
        let plain = EtcdConfig::parse(&format!("etcd://127.0.0.1:{}", etcd.port), "/flotilla/tls", None).unwrap();
        tokio::task::spawn_blocking(move || {
            let s = EtcdStore::open(&with_cert, None).unwrap();
            s.commit(Batch::default().put("a", "over TLS")).unwrap();
            assert_eq!(s.get("a").unwrap().as_deref(), Some(&b"over TLS"[..]));
            for (what, cfg) in [("no client certificate", without_cert), ("no TLS", plain)] {
                let refused = EtcdStore::open(&cfg, None).and_then(|s| s.get("a"));
                assert!(refused.is_err(), "{what}: {refused:?}");
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn soft_state_is_read_at_once_and_written_with_the_next_immediate_batch() {
        let etcd = flotilla_e2e::etcd::Etcd::start();
        let cfg = EtcdConfig::parse(&etcd.url(), "/flotilla/s", None).unwrap();
        tokio::task::spawn_blocking(move || {
            let writer = EtcdStore::open(&cfg, None).unwrap();
            let other = EtcdStore::open(&cfg, None).unwrap();
            let mut reports = Batch::default();
            for i in 0..10_000 {
                reports = reports.put(format!("reports/c-{i:05}"), "healthy");
            }
            let started = Instant::now();
            writer.commit(reports.soft()).unwrap();
            eprintln!("10,000 reports taken as soft state in {:.3} s", started.elapsed().as_secs_f64());
            assert_eq!(writer.keys("reports/").unwrap().len(), 10_000, "read at once by the writer");
            assert_eq!(writer.get("reports/c-00007").unwrap().as_deref(), Some(&b"healthy"[..]));
            assert!(other.keys("reports/").unwrap().is_empty(), "not in etcd yet");
            writer.commit(Batch::default().put("desired/c-00007", "d1").delete("reports/c-00009")).unwrap();
            assert_eq!(other.keys("reports/").unwrap().len(), 9_999, "written with the next immediate batch");
            assert_eq!(other.get("desired/c-00007").unwrap().as_deref(), Some(&b"d1"[..]));
            assert_eq!(writer.get("reports/c-00009").unwrap(), None, "the batch's own operations win");

            // With nothing else to commit, soft state is written once it has waited its time.
            let mut writer = writer;
            writer.set_soft_every(Duration::from_millis(500));
            writer.commit(Batch::default().put("reports/late", "healthy").soft()).unwrap();
            writer.flush_soft().unwrap();
            assert_eq!(other.get("reports/late").unwrap(), None, "not due yet");
            std::thread::sleep(Duration::from_millis(600));
            writer.flush_soft().unwrap();
            assert_eq!(other.get("reports/late").unwrap().as_deref(), Some(&b"healthy"[..]), "written when due");
        })
        .await
        .unwrap();
    }
}
