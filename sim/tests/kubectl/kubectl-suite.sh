#!/usr/bin/env bash
# Drives the real kubectl against a running flotilla-sim cluster.
#
# Needs: KUBECONFIG (one simulated cluster), SIM_ADMIN (the admin base URL, e.g. http://127.0.0.1:PORT/admin),
# SIM_CLUSTER (the cluster's name). Run by sim/tests/kubectl.rs, or by hand:
#   flotilla-sim --listen 127.0.0.1:16443 --cluster demo --kubeconfig-dir /tmp/kc &
#   KUBECONFIG=/tmp/kc/demo.kubeconfig SIM_ADMIN=http://127.0.0.1:16443/admin SIM_CLUSTER=demo \
#     bash sim/tests/kubectl/kubectl-suite.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${KUBECONFIG:?set KUBECONFIG to a simulated cluster's kubeconfig}"
: "${SIM_ADMIN:?set SIM_ADMIN to the simulator's admin URL}"
: "${SIM_CLUSTER:?set SIM_CLUSTER to the cluster name}"
command -v kubectl >/dev/null || { echo "kubectl is missing: install it (Debian: apt-get install -y kubectl from the Kubernetes apt repository, or place the kubectl binary on PATH)"; exit 1; }
work="$(mktemp -d)"
export KUBECACHEDIR="$work/cache"
trap 'rm -rf "$work"; jobs -p | xargs -r kill 2>/dev/null || true' EXIT

passed=0
step() { echo "--- $*"; }
ok() { passed=$((passed + 1)); echo "ok $passed - $*"; }
fail() { echo "FAILED: $*"; exit 1; }
# expect_contains TEXT NEEDLE WHAT
expect_contains() { grep -qF -- "$2" <<<"$1" || fail "$3: expected to find '$2' in:"$'\n'"$1"; }
admin() { # METHOD PATH [JSON]
  python3 - "$1" "$SIM_ADMIN$2" "${3:-}" <<'PY'
import sys, urllib.request
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(url, data=body.encode() if body else None, method=method, headers={"content-type": "application/json"})
print(urllib.request.urlopen(req, timeout=10).read().decode())
PY
}
rv() { kubectl get "$@" -o jsonpath='{.metadata.resourceVersion}'; }
# refused WHAT CMD...: CMD must fail; its output is left in $out.
refused() { local what=$1; shift; set +e; out="$("$@" 2>&1)"; local code=$?; set -e; [ "$code" != 0 ] || fail "$what: $out"; }

step "kubectl version"
out="$(kubectl version 2>&1)"
expect_contains "$out" "Server Version: v1." "kubectl version"
ok "kubectl version reports the simulated server"

step "kubectl api-resources"
out="$(kubectl api-resources)"
for r in deployments statefulsets customresourcedefinitions horizontalpodautoscalers poddisruptionbudgets leases; do
  expect_contains "$out" "$r" "api-resources"
done
ok "kubectl api-resources lists the built-in kinds"

step "server-side apply of a multi-document file"
out="$(kubectl apply --server-side -f "$here/app.yaml")"
echo "$out"
for o in namespace/shop configmap/web-config deployment.apps/web service/web; do
  expect_contains "$out" "$o serverside-applied" "first apply"
done
ok "apply --server-side creates Namespace, ConfigMap, Deployment and Service"

step "the same apply again changes nothing"
before="$(rv -n shop configmap/web-config) $(rv -n shop service/web) $(rv namespace/shop)"
kubectl apply --server-side -f "$here/app.yaml" >/dev/null
after="$(rv -n shop configmap/web-config) $(rv -n shop service/web) $(rv namespace/shop)"
[ "$before" = "$after" ] || fail "a repeated apply changed resourceVersions: $before -> $after"
kubectl diff --server-side -f "$here/app.yaml" >/dev/null || fail "kubectl diff after a repeated apply should report no change"
ok "re-applying leaves every object unchanged (same resourceVersion; kubectl diff exits 0)"

step "managedFields"
out="$(kubectl get -n shop deployment web -o yaml --show-managed-fields)"
expect_contains "$out" "managedFields:" "get -o yaml"
expect_contains "$out" "manager: kubectl" "get -o yaml"
expect_contains "$out" "operation: Apply" "get -o yaml"
expect_contains "$out" 'k:{"name":"web"}' "get -o yaml"
ok "kubectl get -o yaml shows managedFields with the apply manager"

step "kubectl wait --for=condition=Available"
kubectl wait -n shop --for=condition=Available deployment/web --timeout=30s
ok "the Deployment becomes Available"

step "a second field manager conflicts"
cat >"$work/replicas.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 5
EOF
if out="$(kubectl apply --server-side --field-manager=autoscaler-bot -f "$work/replicas.yaml" 2>&1)"; then
  fail "a conflicting apply succeeded: $out"
fi
expect_contains "$out" 'conflict with "kubectl"' "conflicting apply"
expect_contains "$out" ".spec.replicas" "conflicting apply"
kubectl apply --server-side --field-manager=autoscaler-bot --force-conflicts -f "$work/replicas.yaml"
[ "$(kubectl get -n shop deploy web -o jsonpath='{.spec.replicas}')" = 5 ] || fail "forced apply did not set replicas"
ok "a conflicting apply fails naming field and manager, and succeeds with --force-conflicts"

step "kubectl get -w sees changes made by another client"
kubectl get configmaps -n shop -w --output-watch-events >"$work/watch.out" 2>&1 &
watch_pid=$!
for _ in $(seq 1 50); do grep -q web-config "$work/watch.out" && break; sleep 0.1; done
kubectl label -n shop configmap web-config touched=yes >/dev/null
kubectl apply --server-side -f - >/dev/null <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: from-another-client
  namespace: shop
data:
  a: b
EOF
for _ in $(seq 1 50); do grep -q from-another-client "$work/watch.out" && grep -q MODIFIED "$work/watch.out" && break; sleep 0.1; done
kill "$watch_pid" 2>/dev/null || true
out="$(cat "$work/watch.out")"
echo "$out"
expect_contains "$out" "MODIFIED" "get -w"
expect_contains "$out" "from-another-client" "get -w"
ok "kubectl get -w prints an added and a modified object"

step "CustomResourceDefinition, then a custom resource"
kubectl apply --server-side -f "$here/crd.yaml"
kubectl wait --for=condition=Established crd/widgets.example.com --timeout=30s
kubectl apply --server-side -f "$here/widget.yaml"
out="$(kubectl get widgets -n shop)"
echo "$out"
expect_contains "$out" "w1" "get widgets"
expect_contains "$out" "large" "get widgets (printer column)"
out="$(kubectl get wd -A -o name)"
expect_contains "$out" "widget.example.com/w1" "get by short name"
ok "a CRD's kind is served once Established; its custom resources apply and list"

step "kubectl diff --server-side shows a change and exits 1"
sed 's/greeting: hello/greeting: bonjour/' "$here/app.yaml" >"$work/changed.yaml"
set +e
out="$(kubectl diff --server-side --force-conflicts -f "$work/changed.yaml" 2>&1)"
code=$?
set -e
[ "$code" = 1 ] || fail "kubectl diff exited $code, want 1: $out"
expect_contains "$out" "+  greeting: bonjour" "diff"
expect_contains "$out" "-  greeting: hello" "diff"
[ "$(kubectl get -n shop cm web-config -o jsonpath='{.data.greeting}')" = hello ] || fail "diff must not change the live object"
ok "kubectl diff --server-side shows the change without applying it"

step "label-selected get"
out="$(kubectl get configmaps -n shop -l app=web -o name)"
[ "$out" = "configmap/web-config" ] || fail "label selector app=web returned: $out"
out="$(kubectl get configmaps -n shop -l 'app notin (web)' -o name)"
expect_contains "$out" "configmap/from-another-client" "set-based selector"
ok "label selectors filter lists"

step "kubectl scale"
kubectl scale -n shop deployment/web --replicas=3
[ "$(kubectl get -n shop deploy web -o jsonpath='{.spec.replicas}')" = 3 ] || fail "scale did not set replicas"
kubectl wait -n shop --for=jsonpath='{.status.readyReplicas}'=3 deployment/web --timeout=30s
kubectl rollout status -n shop deployment/web --timeout=30s
ok "kubectl scale goes through the scale subresource and the rollout completes"

step "kubectl's client-side apply and patching commands"
out="$(kubectl apply -f "$here/app.yaml" 2>&1)"
expect_contains "$out" "configmap/web-config configured" "client-side apply"
out="$(kubectl apply -f "$here/app.yaml" 2>&1)"
expect_contains "$out" "configmap/web-config unchanged" "client-side apply, again"
kubectl set image -n shop deployment/web web=nginx:1.28 >/dev/null
kubectl rollout status -n shop deployment/web --timeout=30s >/dev/null
kubectl rollout restart -n shop deployment/web >/dev/null
kubectl rollout status -n shop deployment/web --timeout=30s >/dev/null
kubectl patch -n shop configmap web-config --type=json -p '[{"op":"add","path":"/data/json","value":"patched"}]' >/dev/null
kubectl patch -n shop configmap web-config --type=merge -p '{"data":{"merge":"patched"}}' >/dev/null
kubectl annotate -n shop configmap web-config note=hello >/dev/null
EDITOR="sed -i s/greeting:.hello/greeting:\ edited/" kubectl edit -n shop configmap web-config >/dev/null
out="$(kubectl get -n shop configmap web-config -o jsonpath='{.data.json} {.data.merge} {.data.greeting} {.metadata.annotations.note}')"
[ "$out" = "patched patched edited hello" ] || fail "patching commands left: $out"
out="$(kubectl get -n shop deployment web -o jsonpath='{.spec.template.spec.containers[0].image} {.spec.template.metadata.annotations}')"
expect_contains "$out" "nginx:1.28" "set image"
expect_contains "$out" "kubectl.kubernetes.io/restartedAt" "rollout restart"
kubectl apply --server-side --force-conflicts -f "$here/app.yaml" >/dev/null
ok "client-side apply, set image, rollout restart, patch (json, merge, strategic), annotate and edit work"

step "a failing image times out in kubectl rollout status"
admin PATCH "/clusters/$SIM_CLUSTER/behaviour" '{"fail_images": ":broken$"}' >/dev/null
cat >"$work/broken.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: broken
  namespace: shop
spec:
  progressDeadlineSeconds: 2
  selector:
    matchLabels: {app: broken}
  template:
    metadata:
      labels: {app: broken}
    spec:
      containers:
      - name: app
        image: registry.example/app:broken
EOF
kubectl apply --server-side -f "$work/broken.yaml"
set +e
out="$(kubectl rollout status -n shop deployment/broken --timeout=30s 2>&1)"
code=$?
set -e
admin PATCH "/clusters/$SIM_CLUSTER/behaviour" '{"fail_images": null}' >/dev/null
[ "$code" != 0 ] || fail "rollout status of a failing image succeeded: $out"
expect_contains "$out" "exceeded its progress deadline" "rollout status"
ok "rollout status fails with ProgressDeadlineExceeded"

step "bad input"
set +e
out="$(printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  namespace: shop\n' | kubectl create -f - 2>&1)"
code=$?
set -e
[ "$code" != 0 ] || fail "an object without a name was accepted"
expect_contains "$out" "name" "nameless object"
set +e
out="$(kubectl get gizmos 2>&1)"
code=$?
set -e
[ "$code" != 0 ] || fail "an unknown kind was accepted"
expect_contains "$out" 'the server doesn'"'"'t have a resource type "gizmos"' "unknown kind"
ok "nameless objects and unknown kinds are rejected"

step "raw requests at the root of the cluster's URL"
out="$(kubectl get --raw /version)"
expect_contains "$out" '"gitVersion"' "get --raw /version"
out="$(kubectl get --raw /api/v1/namespaces/shop/configmaps/web-config)"
expect_contains "$out" '"name":"web-config"' "get --raw of an object"
out="$(printf '{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"raw-made"},"data":{"a":"b"}}' | kubectl create --raw /api/v1/namespaces/shop/configmaps -f -)"
expect_contains "$out" '"name":"raw-made"' "create --raw"
kubectl get configmap raw-made -n shop >/dev/null
ok "get --raw and create --raw reach the cluster without a path prefix"

step "kubectl explain and strict field validation (OpenAPI v3 schemas)"
out="$(kubectl explain deployment.spec.replicas)"
expect_contains "$out" "FIELD: replicas <integer>" "explain a field"
expect_contains "$out" "Number of desired pods" "explain shows the real description"
kubectl apply --server-side -f - >/dev/null <<'YAML'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gadgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            description: What the gadget should be.
            properties:
              size: {type: integer, description: How big the gadget is.}
YAML
kubectl wait --for=condition=Established crd/gadgets.example.com --timeout=30s >/dev/null
out="$(kubectl explain gadgets.spec.size)"
expect_contains "$out" "How big the gadget is." "explain a custom resource field"
set +e
out="$(printf 'apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: g, namespace: shop}\nspec: {size: 1, colour: red}\n' | kubectl apply --server-side -f - 2>&1)"; code=$?
set -e
[ "$code" != 0 ] || fail "an unknown custom resource field was accepted under Strict"
expect_contains "$out" ".spec.colour: field not declared in schema" "strict custom resource"
printf 'apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: g, namespace: shop}\nspec: {size: 1, colour: red}\n' | kubectl apply --server-side --validate=false -f - >/dev/null
[ "$(kubectl get gadget g -n shop -o jsonpath='{.spec}')" = '{"size":1}' ] || fail "the unknown custom resource field was not pruned"
kubectl delete crd gadgets.example.com >/dev/null
cat > "$work/typo.yaml" <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: typo, namespace: shop}
spec:
  replicass: 2
  selector: {matchLabels: {app: typo}}
  template:
    metadata: {labels: {app: typo}}
    spec:
      containers: [{name: c, image: nginx:1.27, imagePullPolice: Always}]
YAML
refused "an unknown field was accepted by apply --server-side" kubectl apply --server-side -f "$work/typo.yaml"
expect_contains "$out" ".spec.replicass: field not declared in schema" "strict SSA"
expect_contains "$out" ".spec.template.spec.containers[0].imagePullPolice: field not declared in schema" "strict SSA"
refused "an unknown field was accepted by create" kubectl create -f "$work/typo.yaml"
expect_contains "$out" 'strict decoding error: unknown field "spec.replicass"' "strict create"
out="$(kubectl apply --server-side --validate=warn -f "$work/typo.yaml" 2>&1)"
expect_contains "$out" 'Warning: unknown field "spec.replicass"' "a Warning header under Warn"
kubectl apply --server-side --validate=false -f "$work/typo.yaml" >/dev/null
out="$(kubectl get deployment typo -n shop -o json)"
if grep -q replicass <<<"$out"; then fail "an unknown field was stored: $out"; fi
kubectl delete deployment typo -n shop >/dev/null
set +e
out="$(printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: typed, namespace: shop}\ndata: {a: 1}\n' | kubectl apply --server-side -f - 2>&1)"; code=$?
set -e
[ "$code" != 0 ] || fail "a number in ConfigMap data was accepted"
expect_contains "$out" "cannot unmarshal number into Go struct field .data.a of type string" "wrong type"
printf '{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"dup"},"data":{"a":"1","a":"2"}}' >"$work/dup.json"
refused "a field given twice was accepted under Strict" kubectl create --raw '/api/v1/namespaces/shop/configmaps?fieldValidation=Strict' -f "$work/dup.json"
expect_contains "$out" 'strict decoding error: duplicate field "data.a"' "duplicate field"
cat >"$work/list.yaml" <<'YAML'
apiVersion: v1
kind: ConfigMapList
items:
- {apiVersion: v1, kind: ConfigMap, metadata: {name: listed-1, namespace: shop}, data: {a: "1"}}
- {apiVersion: v1, kind: ConfigMap, metadata: {name: listed-2, namespace: shop}, data: {a: "2"}}
YAML
kubectl apply --server-side -f "$work/list.yaml" >/dev/null
[ "$(kubectl get configmap listed-1 listed-2 -n shop -o name | wc -l)" = 2 ] || fail "a ConfigMapList file did not apply"
ok "explain shows real schemas; unknown and duplicate fields are refused under Strict, unknown ones dropped otherwise; wrong types are refused"

step "kubectl's typed generators (protobuf request bodies)"
kubectl create namespace gen >/dev/null
kubectl create configmap g-cm -n gen --from-literal=a=b --from-literal=empty= >/dev/null
kubectl create secret generic g-secret -n gen --from-literal=password=s3cret >/dev/null
kubectl create deployment g-deploy -n gen --image=nginx:1.27 --replicas=2 >/dev/null
kubectl create serviceaccount g-sa -n gen >/dev/null
kubectl create job g-job -n gen --image=busybox:1.36 -- echo hi >/dev/null
kubectl create cronjob g-cron -n gen --image=busybox:1.36 --schedule='*/5 * * * *' -- echo hi >/dev/null
kubectl create role g-role -n gen --verb=get,list --resource=pods >/dev/null
kubectl create rolebinding g-rb -n gen --role=g-role --serviceaccount=gen:g-sa >/dev/null
kubectl create clusterrole g-cr --verb=get --resource=nodes >/dev/null
kubectl create clusterrolebinding g-crb --clusterrole=g-cr --user=someone >/dev/null
kubectl create service clusterip g-svc -n gen --tcp=80:8080 >/dev/null
kubectl create quota g-quota -n gen --hard=cpu=1000m,pods=10 >/dev/null
[ "$(kubectl get configmap g-cm -n gen -o jsonpath='{.data.a}|{.data.empty}|')" = "b||" ] || fail "generated ConfigMap data"
[ "$(kubectl get secret g-secret -n gen -o jsonpath='{.data.password}')" = "czNjcmV0" ] || fail "generated Secret data"
[ "$(kubectl get deployment g-deploy -n gen -o jsonpath='{.spec.replicas} {.spec.strategy.type} {.spec.template.spec.containers[0].image}')" = "2 RollingUpdate nginx:1.27" ] || fail "generated Deployment"
[ "$(kubectl get service g-svc -n gen -o jsonpath='{.spec.ports[0].port} {.spec.ports[0].targetPort}')" = "80 8080" ] || fail "generated Service ports"
[ "$(kubectl get quota g-quota -n gen -o jsonpath='{.spec.hard.cpu}')" = "1" ] || fail "generated quota, canonical"
[ "$(kubectl get role g-role -n gen -o jsonpath='{.rules[0].verbs}')" = '["get","list"]' ] || fail "generated Role rules"
out="$(kubectl get deployment g-deploy -n gen -o yaml)"
for zero in 'generateName: ""' 'selfLink' 'paused: false' 'minReadySeconds: 0'; do
  if grep -qF -- "$zero" <<<"$out"; then fail "a Go zero value from the protobuf body was stored ($zero): $out"; fi
done
kubectl wait --for=condition=complete job/g-job -n gen --timeout=30s >/dev/null
kubectl delete namespace gen --timeout=60s >/dev/null
kubectl delete clusterrolebinding g-crb >/dev/null
kubectl delete clusterrole g-cr >/dev/null
ok "create configmap/secret/deployment/namespace/serviceaccount/job/cronjob/role/rolebinding/clusterrole/clusterrolebinding/service/quota store what a real API server stores"

step "normalization as the API server stores objects"
kubectl apply --server-side -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: shop}
stringData: {password: hunter2}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sized, namespace: shop}
spec:
  selector: {matchLabels: {app: sized}}
  template:
    metadata: {labels: {app: sized}}
    spec:
      containers:
      - name: c
        image: nginx:1.27
        resources: {limits: {cpu: 1000m, memory: 1024Mi}, requests: {cpu: "0.5", memory: 0.5Gi}}
YAML
out="$(kubectl get secret creds -n shop -o json)"
expect_contains "$out" '"password": "aHVudGVyMg=="' "stringData merged into data"
if grep -q stringData <<<"$out"; then fail "stringData is stored: $out"; fi
res="$(kubectl get deployment sized -n shop -o jsonpath='{.spec.template.spec.containers[0].resources}')"
expect_contains "$res" '"limits":{"cpu":"1","memory":"1Gi"}' "canonical limits"
expect_contains "$res" '"requests":{"cpu":"500m","memory":"512Mi"}' "canonical requests"
gen() { kubectl get "$@" -o jsonpath='{.metadata.generation}'; }
before="$(gen -n shop deployment/sized)"
kubectl patch deployment sized -n shop --type merge -p '{"spec":{"template":{"spec":{"containers":[{"name":"c","image":"nginx:1.27","resources":{"limits":{"cpu":"1","memory":"1Gi"},"requests":{"cpu":"500m","memory":"512Mi"}}}]}}}}' >/dev/null
[ "$before" = "$(gen -n shop deployment/sized)" ] || fail "the canonical form of the same quantities counted as a change"
refused "an invalid quantity was accepted" kubectl patch deployment sized -n shop --type merge -p '{"spec":{"template":{"spec":{"containers":[{"name":"c","resources":{"limits":{"cpu":"lots"}}}]}}}}'
expect_contains "$out" "quantities must match the regular expression" "invalid quantity"
ok "Secret stringData is merged into data, quantities are canonical, invalid ones are refused"

step "immutable fields"
refused "a Deployment's selector changed" kubectl patch deployment sized -n shop --type merge -p '{"spec":{"selector":{"matchLabels":{"app":"other"}},"template":{"metadata":{"labels":{"app":"other"}}}}}'
expect_contains "$out" 'spec.selector: Invalid value' "deployment selector"
expect_contains "$out" 'field is immutable' "deployment selector"
kubectl apply --server-side -f - >/dev/null <<'YAML'
apiVersion: batch/v1
kind: Job
metadata: {name: once, namespace: shop}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox:1.36, command: [echo, one]}]
YAML
set +e
out="$(kubectl apply --server-side -f - 2>&1 <<'YAML'
apiVersion: batch/v1
kind: Job
metadata: {name: once, namespace: shop}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox:1.37, command: [echo, two]}]
YAML
)"
code=$?
set -e
[ "$code" != 0 ] || fail "a Job's template changed"
expect_contains "$out" 'spec.template: Invalid value' "job template"
expect_contains "$out" 'field is immutable' "job template"
ip="$(kubectl get service web -n shop -o jsonpath='{.spec.clusterIP}')"
refused "a Service's cluster IP changed" kubectl patch service web -n shop --type merge -p '{"spec":{"clusterIP":"198.18.9.9","clusterIPs":["198.18.9.9"]}}'
expect_contains "$out" 'spec.clusterIP: Invalid value' "service clusterIP"
[ "$ip" = "$(kubectl get service web -n shop -o jsonpath='{.spec.clusterIP}')" ] || fail "the cluster IP moved"
ok "Deployment selector, Job template and Service clusterIP are immutable"

step "admission rules deny writes"
admin PUT "/clusters/$SIM_CLUSTER/admission" '{"rules": [{"kinds": ["ConfigMap"], "labels": {"policy": "deny"}, "deny": "configmaps labelled policy=deny are not allowed"}]}' >/dev/null
set +e
out="$(kubectl create configmap denied -n shop --from-literal=a=b --dry-run=client -o yaml | kubectl label --local -f - policy=deny -o yaml | kubectl apply --server-side -f - 2>&1)"
code=$?
set -e
[ "$code" != 0 ] || fail "a denied ConfigMap was accepted"
expect_contains "$out" 'admission webhook "policy.flotilla-sim.internal" denied the request: configmaps labelled policy=deny are not allowed' "admission denial"
set +e
kubectl get configmap denied -n shop >/dev/null 2>&1 && fail "the denied ConfigMap was stored"
set -e
kubectl create configmap allowed -n shop --from-literal=a=b --dry-run=client -o yaml | kubectl apply --server-side -f - >/dev/null
admin PUT "/clusters/$SIM_CLUSTER/admission" '{"rules": []}' >/dev/null
ok "an admission rule denies matching objects with 403 and its reason, and lets others through"

step "APIService, EndpointSlice, Ingress address, pod eviction"
kubectl apply --server-side -f - >/dev/null <<'YAML'
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.metrics.k8s.io}
spec:
  group: metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  insecureSkipTLSVerify: true
  service: {name: metrics-server, namespace: shop}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [198.18.1.1], conditions: {ready: true}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: shop}
spec:
  rules:
  - host: shop.example.com
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}]}
---
apiVersion: v1
kind: Pod
metadata: {name: evictee, namespace: shop, labels: {app: evictee}}
spec: {containers: [{name: c, image: nginx:1.27}]}
YAML
sleep 1
[ "$(kubectl get apiservice v1beta1.metrics.k8s.io -o jsonpath='{.status.conditions[0].status}/{.status.conditions[0].reason}')" = "False/ServiceNotFound" ] || fail "an APIService without its Service is not Available"
kubectl create service clusterip metrics-server -n shop --tcp=443:4443 --dry-run=client -o yaml | kubectl apply --server-side -f - >/dev/null
kubectl wait --for=condition=Available apiservice/v1beta1.metrics.k8s.io --timeout=10s >/dev/null
kubectl get endpointslice web-1 -n shop -o jsonpath='{.endpoints[0].addresses[0]}' | grep -q 198.18.1.1 || fail "EndpointSlice"
kubectl wait --for=jsonpath='{.status.loadBalancer.ingress[0].ip}' ingress/web -n shop --timeout=10s >/dev/null
admin PATCH "/clusters/$SIM_CLUSTER/behaviour" '{"ingress_controller": false}' >/dev/null
kubectl get ingress web -n shop -o yaml | sed 's/name: web$/name: no-controller/' | grep -v 'resourceVersion\|uid:\|creationTimestamp' | kubectl create -f - >/dev/null
sleep 1
[ -z "$(kubectl get ingress no-controller -n shop -o jsonpath='{.status.loadBalancer.ingress}')" ] || fail "an Ingress got an address without an ingress controller"
admin PATCH "/clusters/$SIM_CLUSTER/behaviour" '{"ingress_controller": true}' >/dev/null
out="$(printf '{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"evictee","namespace":"shop"}}' | kubectl create --raw /api/v1/namespaces/shop/pods/evictee/eviction -f -)"
expect_contains "$out" '"status":"Success"' "eviction"
set +e
kubectl get pod evictee -n shop >/dev/null 2>&1 && fail "the evicted pod is still there"
set -e
kubectl apply --server-side -f - >/dev/null <<'YAML'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gateways.gateway.networking.k8s.io}
spec:
  group: gateway.networking.k8s.io
  scope: Namespaced
  names: {plural: gateways, singular: gateway, kind: Gateway}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
YAML
kubectl wait --for=condition=Established crd/gateways.gateway.networking.k8s.io --timeout=30s >/dev/null
printf 'apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: shop}\nspec: {gatewayClassName: sim, listeners: [{name: http, port: 80, protocol: HTTP}]}\n' | kubectl apply --server-side -f - >/dev/null
kubectl wait --for=condition=Programmed gateway/gw -n shop --timeout=10s >/dev/null
kubectl get gateway gw -n shop -o jsonpath='{.status.addresses[0].value}' | grep -q '^198\.19\.' || fail "the Gateway has no address"
kubectl delete crd gateways.gateway.networking.k8s.io >/dev/null
ok "an APIService is Available once its Service exists; EndpointSlices are served; an Ingress and a Gateway get an address; a pod can be evicted"

step "optional ReplicaSets and Pods: get pods, logs, rollout history"
admin PATCH "/clusters/$SIM_CLUSTER/behaviour" '{"pods": true}' >/dev/null
kubectl create deployment podded -n shop --image=nginx:1.27 --replicas=2 >/dev/null
kubectl rollout status deployment/podded -n shop --timeout=30s >/dev/null
kubectl wait --for=condition=Ready pod -l app=podded -n shop --timeout=30s >/dev/null
[ "$(kubectl get pods -n shop -l app=podded --no-headers | wc -l)" = 2 ] || fail "two pods for two replicas"
kubectl set image deployment/podded -n shop nginx=nginx:1.28 >/dev/null
kubectl rollout status deployment/podded -n shop --timeout=30s >/dev/null
for _ in $(seq 50); do
  [ "$(kubectl get pods -n shop -l app=podded -o jsonpath='{.items[*].spec.containers[0].image}')" = "nginx:1.28 nginx:1.28" ] && break
  sleep 0.2
done
[ "$(kubectl get pods -n shop -l app=podded -o jsonpath='{.items[*].spec.containers[0].image}')" = "nginx:1.28 nginx:1.28" ] || fail "the pods were not replaced by the new template"
out="$(kubectl rollout history deployment/podded -n shop)"
expect_contains "$out" "2         <none>" "rollout history"
out="$(kubectl logs deployment/podded -n shop)"
expect_contains "$out" "container nginx (image nginx:1.28)" "kubectl logs"
kubectl delete deployment podded -n shop >/dev/null
for _ in $(seq 50); do
  [ -z "$(kubectl get pods,rs -n shop -l app=podded -o name)" ] && break
  sleep 0.2
done
[ -z "$(kubectl get pods,rs -n shop -l app=podded -o name)" ] || fail "the deployment's ReplicaSets and Pods outlived it"
admin PATCH "/clusters/$SIM_CLUSTER/behaviour" '{"pods": false}' >/dev/null
ok "with pods on, a Deployment runs ReplicaSets and Pods that kubectl lists, logs and shows in rollout history"

step "kubectl delete namespace removes what it held"
kubectl delete namespace shop --timeout=60s
set +e
out="$(kubectl get namespace shop 2>&1)"
set -e
expect_contains "$out" 'namespaces "shop" not found' "deleted namespace"
out="$(kubectl get all,configmaps,widgets -n shop 2>&1)"
expect_contains "$out" "No resources found" "namespace contents"
ok "deleting a namespace removes its contents, then the namespace"

echo "$passed passed, 0 failed"
