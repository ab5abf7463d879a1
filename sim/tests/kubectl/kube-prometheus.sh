#!/usr/bin/env bash
# Applies the kube-prometheus manifests verbatim with kubectl's defaults (server-side apply, strict field
# validation) to a simulated cluster and checks that every object is served afterwards.
#
# Needs: KUBECONFIG (one simulated cluster), MANIFESTS (kube-prometheus' manifests/ directory).
set -euo pipefail
: "${KUBECONFIG:?set KUBECONFIG to a simulated cluster's kubeconfig}"
: "${MANIFESTS:?set MANIFESTS to kube-prometheus' manifests directory}"
work="$(mktemp -d)"
export KUBECACHEDIR="$work/cache"
trap 'rm -rf "$work"' EXIT

kubectl apply --server-side -f "$MANIFESTS/setup" >"$work/setup.out"
kubectl wait --for=condition=Established --all crd --timeout=60s >/dev/null
kubectl apply --server-side -f "$MANIFESTS" >"$work/apply.out"
applied=$(cat "$work/setup.out" "$work/apply.out" | grep -c ' serverside-applied$')
# Every object of every file (lists flattened) is served.
kubectl get -f "$MANIFESTS/setup" -f "$MANIFESTS" -o name >"$work/served.out"
served=$(wc -l <"$work/served.out")
[ "$served" = "$applied" ] || { echo "FAILED: $applied objects applied, $served served"; exit 1; }
# Applying again changes nothing (no new generation, the same managed fields).
state() { kubectl get -f "$MANIFESTS" -o jsonpath='{range .items[*]}{.kind}/{.metadata.name} {.metadata.generation} {.metadata.managedFields[*].manager}{"\n"}{end}'; }
state >"$work/before"
kubectl apply --server-side -f "$MANIFESTS" >/dev/null
state >"$work/after"
diff "$work/before" "$work/after" || { echo "FAILED: a second apply changed objects"; exit 1; }
kubectl wait --for=condition=Available apiservice/v1beta1.metrics.k8s.io --timeout=30s >/dev/null
echo "kube-prometheus: $applied objects applied and served"
