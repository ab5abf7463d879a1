//! Renderers in a box, through the real kustomize (kubectl's): remote resources never reach the network
//! unless the fleet allows them, a YAML alias bomb ends at the memory limit, output is capped, and shared
//! bases are part of the content address of every app that includes them.

mod support;

use support::{tools, tree};

use flotilla_common::fleet::render::{render_fleet, RenderCache, Tools};
use flotilla_common::fleet::{parse, Tree};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A loopback HTTP server that counts connections and answers every request with one ConfigMap.
fn counting_server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let end = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < end {
            match listener.accept() {
                Ok((mut s, _)) => {
                    c.fetch_add(1, Ordering::SeqCst);
                    s.set_nonblocking(false).ok();
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    let body = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fetched}\ndata: {from: network}\n";
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    (format!("http://{addr}"), count)
}

fn remote_fleet(url: &str, fleet_yaml: &str) -> Tree {
    tree(&[
        ("fleet.yaml", fleet_yaml),
        ("clusters/c.yaml", "labels: {}\n"),
        ("apps/remote/app.yaml", "namespace: r\nkustomize: {path: .}\ntargets: [{selector: {}}]\n"),
        ("apps/remote/kustomization.yaml", &format!("resources: ['{url}/cm.yaml']\n")),
        ("apps/local/app.yaml", "namespace: l\ntargets: [{selector: {}}]\n"),
        ("apps/local/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fine}\n"),
    ])
}

#[test]
fn a_remote_kustomize_resource_is_refused_and_never_fetched() {
    let (url, count) = counting_server();
    let r = render_fleet(&parse(&remote_fleet(&url, "")), &tools(), &mut RenderCache::default());
    let e = r.clusters["c"]["remote"].as_ref().unwrap_err().to_string();
    assert!(
        e.starts_with("apps/remote: kustomize build . refused: kustomization.yaml: resources: remote resource"),
        "{e}"
    );
    assert!(e.contains("renderers.allowRemote"), "{e}");
    assert!(r.clusters["c"]["local"].is_ok(), "other apps keep flowing");
    // Past the check (a tool called directly, as a bug would): the box has no network either.
    let files = tree(&[("kustomization.yaml", &format!("resources: ['{url}/cm.yaml']\n"))]);
    let direct = tools().kustomize(&files, ".", false);
    assert!(direct.is_err(), "{direct:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count.load(Ordering::SeqCst), 0, "no request reached the server");
}

#[test]
fn a_remote_resource_the_fleet_allows_is_fetched() {
    let (url, count) = counting_server();
    let fleet = format!("renderers: {{allowRemote: ['{url}/']}}\n");
    let r = render_fleet(&parse(&remote_fleet(&url, &fleet)), &tools(), &mut RenderCache::default());
    let b = r.clusters["c"]["remote"].as_ref().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b.ids, vec!["ConfigMap r/fetched".to_string()]);
    assert!(count.load(Ordering::SeqCst) >= 1);
}

/// 420 bytes that expand to 9^9 strings.
fn alias_bomb() -> String {
    let mut s = String::from("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bomb}\ndata:\n  a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
    let mut prev = 'a';
    for n in "bcdefghi".chars() {
        s.push_str(&format!("  {n}: &{n} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
        prev = n;
    }
    s
}

#[test]
fn an_alias_bomb_ends_at_the_limits_and_other_apps_keep_flowing() {
    let t = tree(&[
        ("clusters/c.yaml", "labels: {}\n"),
        ("apps/bomb/app.yaml", "namespace: b\nkustomize: {path: .}\ntargets: [{selector: {}}]\n"),
        ("apps/bomb/kustomization.yaml", "resources: [cm.yaml]\n"),
        ("apps/bomb/cm.yaml", &alias_bomb()),
        ("apps/plain-bomb/app.yaml", "namespace: p\ntargets: [{selector: {}}]\n"),
        ("apps/plain-bomb/cm.yaml", &alias_bomb()),
        ("apps/local/app.yaml", "namespace: l\ntargets: [{selector: {}}]\n"),
        ("apps/local/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fine}\n"),
    ]);
    let mut tools = tools();
    tools.limits.memory = 1 << 30;
    let started = std::time::Instant::now();
    let r = render_fleet(&parse(&t), &tools, &mut RenderCache::default());
    let e = r.clusters["c"]["bomb"].as_ref().unwrap_err().to_string();
    assert!(e.contains("ran out of its memory limit (1024 MiB)"), "{e}");
    let e = r.clusters["c"]["plain-bomb"].as_ref().unwrap_err().to_string();
    assert!(e.contains("apps/plain-bomb/cm.yaml"), "our own reader refuses it too: {e}");
    assert!(r.clusters["c"]["local"].is_ok());
    eprintln!("alias bomb refused in {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn output_over_the_limit_stops_the_renderer() {
    let mut tools = tools();
    tools.limits.output = 1024;
    let big =
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big}}\ndata: {{k: '{}'}}\n", "x".repeat(4096));
    let files = tree(&[("kustomization.yaml", "resources: [cm.yaml]\n"), ("cm.yaml", &big)]);
    let e = tools.kustomize(&files, ".", false).unwrap_err();
    assert!(e.contains("printed more than 1024 bytes: stopped"), "{e}");
}

fn shared_base_fleet(base_image: &str) -> Tree {
    tree(&[
        ("clusters/c.yaml", "labels: {}\n"),
        ("bases/web/kustomization.yaml", "resources: [deploy.yaml]\n"),
        (
            "bases/web/deploy.yaml",
            &format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: web, image: '{base_image}'}}]}}\n"),
        ),
        ("apps/shop-eu/app.yaml", "namespace: shop-eu\nkustomize: {path: overlays/eu, include: [../../bases/web]}\ntargets: [{selector: {}}]\n"),
        ("apps/shop-eu/overlays/eu/kustomization.yaml", "resources: [../../../../bases/web]\nnamePrefix: eu-\n"),
        ("apps/shop-us/app.yaml", "namespace: shop-us\nkustomize: {path: ., include: [../../bases/web]}\ntargets: [{selector: {}}]\n"),
        ("apps/shop-us/kustomization.yaml", "resources: [../../bases/web]\nnamePrefix: us-\n"),
        ("apps/other/app.yaml", "namespace: other\ntargets: [{selector: {}}]\n"),
        ("apps/other/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n"),
    ])
}

#[test]
fn two_apps_share_a_base_and_a_change_to_it_is_a_change_to_both() {
    let tools = tools();
    let mut cache = RenderCache::default();
    let v1 = render_fleet(&parse(&shared_base_fleet("web:1")), &tools, &mut cache);
    let digest = |r: &flotilla_common::fleet::render::Rendered, app: &str| {
        r.clusters["c"][app].as_ref().unwrap_or_else(|e| panic!("{app}: {e}")).digest.clone()
    };
    assert_eq!(v1.clusters["c"]["shop-eu"].as_ref().unwrap().ids, vec!["Deployment shop-eu/eu-web".to_string()]);
    assert_eq!(v1.clusters["c"]["shop-us"].as_ref().unwrap().ids, vec!["Deployment shop-us/us-web".to_string()]);
    let v2 = render_fleet(&parse(&shared_base_fleet("web:2")), &tools, &mut cache);
    assert_ne!(digest(&v1, "shop-eu"), digest(&v2, "shop-eu"), "the base is part of the content address");
    assert_ne!(digest(&v1, "shop-us"), digest(&v2, "shop-us"));
    assert_eq!(digest(&v1, "other"), digest(&v2, "other"), "an app that does not include it is unchanged");
    // Without the include, the base is outside what the build may read.
    let mut t = shared_base_fleet("web:1");
    t.insert(
        "apps/shop-us/app.yaml".into(),
        b"namespace: shop-us\nkustomize: {path: .}\ntargets: [{selector: {}}]\n".to_vec(),
    );
    let r = render_fleet(&parse(&t), &tools, &mut RenderCache::default());
    let e = r.clusters["c"]["shop-us"].as_ref().unwrap_err().to_string();
    assert!(e.contains("points outside the files the renderer may read (share a base with kustomize.include"), "{e}");
    // An include must stay in the repository and outside the app itself.
    for bad in ["../../../etc", "/etc", "."] {
        let mut t = shared_base_fleet("web:1");
        t.insert(
            "apps/shop-us/app.yaml".into(),
            format!("namespace: shop-us\nkustomize: {{path: ., include: ['{bad}']}}\ntargets: [{{selector: {{}}}}]\n")
                .into_bytes(),
        );
        let e = parse(&t).apps["shop-us"].spec.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("kustomize.include[0]") && e.contains("must name a directory of the repository"),
            "{bad}: {e}"
        );
    }
}
