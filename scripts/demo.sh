#!/usr/bin/env bash
# Demo of the simulated clusters: a dozen clusters in one process, driven by the real kubectl.
# Applies an app to every cluster, rolls out a new version, breaks some clusters with the failure rule and
# a network fault, and shows the fleet after each step. `--keep` leaves the simulator running at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep" ] && keep=1
command -v kubectl >/dev/null || { echo "kubectl is missing: install it (apt-get install -y kubectl)"; exit 1; }

cargo build -q -p flotilla-sim
dir="$PWD/target/demo"
rm -rf "$dir" && mkdir -p "$dir"
clusters=(eu-1 eu-2 eu-3 eu-4 us-1 us-2 us-3 us-4 ap-1 ap-2 ap-3 ap-4)
./target/debug/flotilla-sim --listen 127.0.0.1:0 --cluster "$(IFS=,; echo "${clusters[*]}")" \
  --kubeconfig-dir "$dir" --ready-after-ms 1500 --progress-deadline-cap-s 6 >"$dir/sim.log" 2>&1 &
sim_pid=$!
[ "$keep" = 1 ] || trap 'kill $sim_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do [ -s "$dir/server" ] && break; sleep 0.1; done
server="$(cat "$dir/server")"
export KUBECACHEDIR="$dir/cache"
admin() { python3 -c 'import sys,urllib.request; r=urllib.request.Request(sys.argv[2],data=sys.argv[3].encode(),method=sys.argv[1],headers={"content-type":"application/json"}); urllib.request.urlopen(r,timeout=10).read()' "$1" "$server/admin$2" "$3"; }
k() { local c=$1; shift; KUBECONFIG="$dir/$c.kubeconfig" kubectl "$@"; }
# each CMD...: runs `k CLUSTER CMD...` on every cluster in parallel and waits for those (not the simulator).
each() {
  local pids=()
  for c in "${clusters[@]}"; do k "$c" "$@" >/dev/null & pids+=($!); done
  wait "${pids[@]}"
}

fleet() {
  printf '%-6s %-28s %-6s %-10s %-24s %s\n' CLUSTER IMAGE READY AVAILABLE PROGRESS "LOAD BALANCER"
  for c in "${clusters[@]}"; do
    if out="$(k "$c" get -n shop deploy/web svc/web -o jsonpath='{.items[0].spec.template.spec.containers[0].image} {.items[0].status.readyReplicas}/{.items[0].spec.replicas} {.items[0].status.conditions[?(@.type=="Available")].status} {.items[0].status.conditions[?(@.type=="Progressing")].reason} {.items[1].status.loadBalancer.ingress[0].ip}' --request-timeout=2s 2>/dev/null)"; then
      read -r image ready avail progress lb <<<"$out"
      printf '%-6s %-28s %-6s %-10s %-24s %s\n' "$c" "$image" "$ready" "${avail:-False}" "${progress:--}" "${lb:-<pending>}"
    else
      printf '%-6s %s\n' "$c" "unreachable"
    fi
  done
}

echo "== $((${#clusters[@]})) simulated clusters on $server (kubeconfigs in $dir)"
echo
echo "== kubectl apply --server-side -f sim/examples/shop.yaml, on every cluster"
each apply --server-side -f sim/examples/shop.yaml
fleet
echo
echo "== waiting for every cluster to report the Deployment Available"
each wait -n shop --for=condition=Available deploy/web --timeout=30s
fleet
echo
echo "== rolling out shop:2.0; the ap clusters run a failure rule: images ending in :2.0 never become ready"
for c in ap-1 ap-2 ap-3 ap-4; do admin PATCH "/clusters/$c/behaviour" '{"fail_images": "shop:2\\.0$"}'; done
each set image -n shop deploy/web web=registry.example/shop:2.0
pids=()
for c in "${clusters[@]}"; do
  ( if k "$c" rollout status -n shop deploy/web --timeout=30s >/dev/null 2>"$dir/$c.rollout"; then
      echo "$c: rolled out" >"$dir/$c.result"
    else
      echo "$c: FAILED: $(tr -d '\n' <"$dir/$c.rollout")" >"$dir/$c.result"
    fi ) & pids+=($!)
done
wait "${pids[@]}"
for c in "${clusters[@]}"; do cat "$dir/$c.result"; done
echo
echo "== us-2 goes offline (connections dropped)"
admin PUT /clusters/us-2/faults '{"offline": true}'
fleet
echo
if [ "$keep" = 1 ]; then
  echo "The simulator keeps running (pid $sim_pid). Try: KUBECONFIG=$dir/eu-1.kubeconfig kubectl get all -n shop"
  echo "Admin API: $server/admin/clusters"
else
  echo "Done. Run scripts/demo.sh --keep to leave the clusters running."
fi
