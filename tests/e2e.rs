//! Commit → hub → mTLS gRPC stream → agent → cluster, with real processes: a fleet repository served by
//! `git daemon`, the hub, a simulator with three clusters (and one the inventory does not list), and one
//! agent process per cluster.

use flotilla_e2e::{
    commit, eventually, free_port, git_daemon, kube, operator_client, spawn, start_agent, start_hub, value, Proc,
};
use flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient;
use flotilla_proto::platform::v1::ListClustersRequest;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const CLUSTERS: [&str; 3] = ["eu-1", "eu-2", "us-1"];

fn shop(greeting: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop-config\ndata:\n  greeting: {greeting}\n"
    )
}

fn eu_only(value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: eu-config\n  namespace: default\ndata:\n  value: {value}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_reaches_the_targeted_clusters_over_mtls() {
    flotilla_common::install_crypto_provider();
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    eprintln!("e2e work directory (logs): {}", tmp.display());
    // Certificates for the hub, the three clusters, a cluster missing from the inventory, and an operator.
    flotilla_e2e::issue_certs(tmp, "eu-1,eu-2,us-1,ghost", "alice");

    // The fleet repository, served by git daemon.
    let served = tmp.join("served");
    let repo = flotilla_e2e::new_repo(tmp);
    let all = "namespace: shop\ntargets:\n- selector:\n    matchExpressions: [{key: region, operator: In, values: [eu, us]}]\n";
    commit(
        &repo,
        &[
            ("clusters/eu-1.yaml", Some("labels: {region: eu}\n")),
            ("clusters/eu-2.yaml", Some("labels: {region: eu}\n")),
            ("clusters/us-1.yaml", Some("labels: {region: us}\n")),
            ("apps/shop/app.yaml", Some(all)),
            ("apps/shop/manifests.yaml", Some(&shop("hello"))),
            ("apps/eu-only/app.yaml", Some("namespace: default\ntargets:\n- selector: {matchLabels: {region: eu}}\n")),
            ("apps/eu-only/cm.yaml", Some(&eu_only("one"))),
        ],
        "first",
    );
    let (daemon, git_port) = git_daemon(&served);
    let _daemon = daemon;
    let repo_url = format!("git://127.0.0.1:{git_port}/fleet.git");

    // Simulated clusters, including "ghost", which the inventory does not list.
    let sim_args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--cluster".into(),
        "eu-1,eu-2,us-1,ghost,spy".into(),
        "--kubeconfig-dir".into(),
        tmp.join("kc").display().to_string(),
    ];
    let _sim = spawn("flotilla-sim", &sim_args, &tmp.join("sim.log"));
    eventually(20, "the simulator", || async { tmp.join("kc/server").exists().then_some(()) }).await;

    let hub_port = free_port();
    let mut hub = start_hub(tmp, hub_port, &repo_url);
    let mut agents: Vec<Proc> = CLUSTERS.iter().map(|c| start_agent(tmp, hub_port, c, c)).collect();
    // The ghost agent has a valid certificate but no place in the inventory.
    agents.push(start_agent(tmp, hub_port, "ghost", "ghost"));
    // An agent holding us-1's certificate serves us-1's state, whatever cluster it runs in.
    agents.push(start_agent(tmp, hub_port, "spy", "us-1"));

    let mut clients = Vec::new();
    for c in CLUSTERS {
        clients.push(kube(&tmp.join("kc"), c).await);
    }
    let ghost = kube(&tmp.join("kc"), "ghost").await;

    // The first commit reaches every targeted cluster, and only those.
    for (c, client) in CLUSTERS.iter().zip(&clients) {
        eventually(60, &format!("shop on {c}"), || async {
            (value(client, "shop", "shop-config", "greeting").await.as_deref() == Some("hello")).then_some(())
        })
        .await;
    }
    for (c, client) in CLUSTERS.iter().zip(&clients) {
        let eu = value(client, "default", "eu-config", "value").await;
        if c.starts_with("eu") {
            eventually(30, &format!("eu-only on {c}"), || async {
                (value(client, "default", "eu-config", "value").await.as_deref() == Some("one")).then_some(())
            })
            .await;
        } else {
            assert_eq!(eu, None, "eu-only must not reach {c}");
        }
    }

    // A new commit reaches all three.
    commit(&repo, &[("apps/shop/manifests.yaml", Some(&shop("bonjour")))], "second");
    for (c, client) in CLUSTERS.iter().zip(&clients) {
        eventually(60, &format!("the second commit on {c}"), || async {
            (value(client, "shop", "shop-config", "greeting").await.as_deref() == Some("bonjour")).then_some(())
        })
        .await;
    }

    // A removed target stops receiving updates: eu-2 is relabelled out of every target.
    commit(
        &repo,
        &[
            ("clusters/eu-2.yaml", Some("labels: {region: retired}\n")),
            ("apps/eu-only/cm.yaml", Some(&eu_only("two"))),
            ("apps/shop/manifests.yaml", Some(&shop("hallo"))),
        ],
        "third",
    );
    eventually(60, "the third commit on eu-1", || async {
        (value(&clients[0], "default", "eu-config", "value").await.as_deref() == Some("two")).then_some(())
    })
    .await;
    eventually(60, "the third commit on us-1", || async {
        (value(&clients[2], "shop", "shop-config", "greeting").await.as_deref() == Some("hallo")).then_some(())
    })
    .await;
    // eu-2 left every target: it gets no update, and the agent prunes what the apps had put there.
    eventually(30, "eu-2's objects pruned", || async {
        let eu = value(&clients[1], "default", "eu-config", "value").await;
        let shop = value(&clients[1], "shop", "shop-config", "greeting").await;
        (eu.is_none() && shop.is_none()).then_some(())
    })
    .await;

    // The cluster missing from the inventory received nothing.
    let ghost_cms: Api<ConfigMap> = Api::all(ghost.clone());
    assert!(ghost_cms.list(&Default::default()).await.unwrap().items.is_empty());

    // The certificate decides what an agent receives: the agent with us-1's certificate got us-1's state
    // (shop) and never eu-1's (eu-only).
    let spy = kube(&tmp.join("kc"), "spy").await;
    eventually(30, "us-1's state on the spy cluster", || async {
        value(&spy, "shop", "shop-config", "greeting").await.map(|_| ())
    })
    .await;
    assert_eq!(value(&spy, "default", "eu-config", "value").await, None);

    // The platform API refuses a caller without an operator certificate.
    let mut as_cluster = flotilla_e2e::platform_client_as(&tmp.join("certs"), hub_port, "clusters/eu-1").await;
    let denied = as_cluster.list_clusters(ListClustersRequest::default()).await.unwrap_err();
    let read = |f: &str| std::fs::read_to_string(tmp.join("certs").join(f)).unwrap();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    // A certificate from another CA is refused at the TLS handshake.
    let other = tmp.join("other-ca");
    let out = std::process::Command::new(flotilla_e2e::binary("flotilla"))
        .args(["certs", "--dir"])
        .arg(&other)
        .args(["--operator", "alice"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            std::fs::read_to_string(other.join("operators/alice.pem")).unwrap(),
            std::fs::read_to_string(other.join("operators/alice-key.pem")).unwrap(),
        ))
        .domain_name("localhost");
    let refused = match Channel::from_shared(format!("https://localhost:{hub_port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
    {
        Err(_) => true,
        Ok(ch) => PlatformServiceClient::new(ch).list_clusters(ListClustersRequest::default()).await.is_err(),
    };
    assert!(refused, "a foreign CA's certificate must not get through");

    // The fleet view, through the platform API with an operator certificate.
    let mut op = operator_client(&tmp.join("certs"), hub_port).await;
    let view = eventually(30, "eu-1 in sync", || {
        let mut op = op.clone();
        async move {
            let v = op.list_clusters(ListClustersRequest::default()).await.ok()?.into_inner();
            let eu1 = v.clusters.iter().find(|c| c.name == "eu-1")?;
            (eu1.connected && eu1.apps_in_sync == eu1.apps_total && eu1.apps_total == 2).then_some(v)
        }
    })
    .await;
    assert_eq!(view.clusters.len(), 3, "the inventory has three clusters");
    assert!(view.source_error.is_empty());

    // The CLI shows the same view.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(flotilla_e2e::binary("flotilla"))
            .args(args)
            .args(["--hub", &format!("https://localhost:{hub_port}"), "--operator", "alice", "--certs"])
            .arg(tmp.join("certs"))
            .output()
            .unwrap();
        assert!(out.status.success(), "flotilla {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = cli(&["clusters"]);
    assert!(table.contains("CLUSTER") && table.contains("eu-1") && table.contains("2/2"), "{table}");
    let one = cli(&["cluster", "eu-1", "-o", "json"]);
    assert!(one.contains("\"appsInSync\": 2"), "{one}");

    // A malformed manifest marks the app with file and line, and the previous good state stays applied.
    commit(
        &repo,
        &[("apps/shop/manifests.yaml", Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [broken\n"))],
        "broken",
    );
    let marked = eventually(30, "the broken commit reported on eu-1", || async {
        let j = cli(&["cluster", "eu-1", "-o", "json"]);
        j.contains("apps/shop/manifests.yaml:").then_some(j)
    })
    .await;
    assert!(marked.contains("apps/shop/manifests.yaml:"), "{marked}");
    assert_eq!(
        value(&clients[0], "shop", "shop-config", "greeting").await.as_deref(),
        Some("hallo"),
        "nothing half-applied"
    );

    // A document without a kind is reported the same way.
    commit(
        &repo,
        &[("apps/shop/manifests.yaml", Some("apiVersion: v1\nmetadata:\n  name: nameless-kind\n"))],
        "no kind",
    );
    eventually(30, "the missing kind reported on eu-1", || async {
        cli(&["cluster", "eu-1"]).contains("apps/shop/manifests.yaml:1: the document has no kind").then_some(())
    })
    .await;
    assert_eq!(value(&clients[0], "shop", "shop-config", "greeting").await.as_deref(), Some("hallo"));

    // An unreachable repository shows as an error, and the hub keeps serving.
    drop(_daemon);
    let errors = eventually(30, "the fetch error in the view", || async {
        let t = cli(&["clusters"]);
        t.contains("error following the fleet repository").then_some(t)
    })
    .await;
    assert!(errors.contains("eu-1"), "{errors}");

    // Restart: kill -9 the hub and start it again; agents reconnect, nothing they applied is applied again,
    // and the view is as before.
    let applies = |c: &str| {
        std::fs::read_to_string(tmp.join(format!("agent-{c}-as-{c}.log")))
            .unwrap_or_default()
            .matches(" applied ")
            .count()
    };
    let applied_before: Vec<usize> = CLUSTERS.iter().map(|c| applies(c)).collect();
    hub.kill();
    let before: Vec<(String, u32)> = view.clusters.iter().map(|c| (c.name.clone(), c.apps_total)).collect();
    let _hub2 = start_hub(tmp, hub_port, &repo_url);
    op = operator_client(&tmp.join("certs"), hub_port).await;
    let after = eventually(60, "agents reconnected after the restart", || {
        let mut op = op.clone();
        async move {
            let v = op.list_clusters(ListClustersRequest::default()).await.ok()?.into_inner();
            v.clusters.iter().all(|c| c.connected).then_some(v)
        }
    })
    .await;
    let after_totals: Vec<(String, u32)> = after.clusters.iter().map(|c| (c.name.clone(), c.apps_total)).collect();
    assert_eq!(after_totals, before);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let applied_after: Vec<usize> = CLUSTERS.iter().map(|c| applies(c)).collect();
    assert_eq!(applied_after, applied_before, "a reconnecting agent re-applies nothing");
    drop(agents);
}
