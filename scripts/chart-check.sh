#!/usr/bin/env bash
# Offline checks of the Helm chart charts/llmo. Needs no cluster and no Rust build.
#
#   bash scripts/chart-check.sh
#
# 1. the chart's CRD copies match crds/ (scripts/chart-sync-crds.sh --check);
# 2. `helm lint --strict` with the default values and with every optional feature on;
# 3. `helm template` with several value sets, and assertions on what comes out: which objects,
#    the operator and agent command lines, secure pod defaults, the exact RBAC rules (least
#    privilege: a new verb must be added here on purpose), the CRD flavour by Kubernetes version
#    (1.20.2 gets no x-kubernetes-validations), CRDs identical to crds/ but for the chart's labels;
# 4. bad values are refused by values.schema.json (and by the templates' own guards);
# 5. every rendered object validates offline with kubernetes-validate (built-in kinds; llmo's and
#    the Prometheus Operator's kinds are custom and reported as skipped);
# 6. the Grafana dashboard is valid JSON whose PromQL parses and names only metrics llmo exports;
# 7. every value in values.yaml has a comment, and every schema property a description.
#
# Tools are cached outside the checkout: helm by scripts/helm.sh, kubernetes-validate (pinned) and
# promql-parser in a virtual environment at $LLMO_CACHE/venv (default ~/.cache/llmo/venv). A run
# with both cached takes a few seconds and touches no network.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CHART="$ROOT/charts/llmo"
CACHE="${LLMO_CACHE:-$HOME/.cache/llmo}"
VENV="$CACHE/venv"
KV_VERSION="1.37.0"
PROMQL_VERSION="0.11.0"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0
declare -a failures=()
declare -a notes=()

ok() { passed=$((passed + 1)); printf '  ok    %s\n' "$*"; }
bad() { failed=$((failed + 1)); failures+=("$*"); printf '  FAIL  %s\n' "$*"; }
note() { notes+=("$*"); }
section() { printf '\n== %s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
section "tools"
HELM="$(bash "$ROOT/scripts/helm.sh")"
echo "  helm: $HELM ($("$HELM" version --template '{{.Version}}'))"

# kubernetes-validate (and promql-parser, for the dashboard) in a venv; `pip install --target`
# where the venv module is missing (Debian without python3-venv).
PY=""
python_ready() { # python -> kubernetes_validate at the pinned version?
    "$@" -c "import kubernetes_validate.version as v, sys; sys.exit(v.__version__ != '$KV_VERSION')" 2>/dev/null
}
if [[ -x "$VENV/bin/python" ]] && python_ready "$VENV/bin/python"; then
    PY="$VENV/bin/python"
elif [[ -d "$CACHE/pylib" ]] && PYTHONPATH="$CACHE/pylib" python_ready python3; then
    PY="python3"
    export PYTHONPATH="$CACHE/pylib"
else
    echo "  installing kubernetes-validate==$KV_VERSION into $VENV" >&2
    if python3 -m venv "$VENV" >/dev/null 2>&1 && [[ -x "$VENV/bin/pip" ]]; then
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION" >&2
        PY="$VENV/bin/python"
    else
        rm -rf "$VENV"
        echo "  (no python3 venv module: installing into $CACHE/pylib)" >&2
        python3 -m pip install --quiet --disable-pip-version-check --target "$CACHE/pylib" \
            "kubernetes-validate==$KV_VERSION" >&2
        PY="python3"
        export PYTHONPATH="$CACHE/pylib"
    fi
fi
if ! $PY -c 'import promql_parser' 2>/dev/null; then
    # Binary wheels only: never build the Rust extension here.
    if [[ -n "${PYTHONPATH:-}" ]]; then
        python3 -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
            --target "$CACHE/pylib" "promql-parser==$PROMQL_VERSION" >&2 || true
    else
        "$VENV/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: \
            "promql-parser==$PROMQL_VERSION" >&2 || true
    fi
fi
echo "  kubernetes-validate: $($PY -m kubernetes_validate --version)"

# The oldest Kubernetes version kubernetes-validate has schemas for: 1.20.0 if it knows it (the
# oldest version llmo supports), else its oldest.
KV_VERSIONS="$($PY -c 'import kubernetes_validate.utils as u; print(" ".join(u.all_versions()))')"
if [[ " $KV_VERSIONS " == *" 1.20.0 "* ]]; then
    KV_OLDEST="1.20.0"
else
    KV_OLDEST="$($PY -c 'import kubernetes_validate.utils as u; print(sorted(u.all_versions(), key=lambda v: tuple(map(int, v.split("."))))[0])')"
    note "kubernetes-validate $KV_VERSION has no schemas before $KV_OLDEST: 1.20 renders are validated against $KV_OLDEST"
fi
KV_LATEST="$($PY -c 'import kubernetes_validate.utils as u; print(u.latest_version())')"

# ---------------------------------------------------------------------------------------------
section "CRDs in the chart match crds/"
if out="$(bash "$ROOT/scripts/chart-sync-crds.sh" --check 2>&1)"; then
    ok "$out"
else
    printf '%s\n' "$out" | sed 's/^/        /'
    bad "chart CRDs drifted from crds/ (run scripts/chart-sync-crds.sh)"
fi

# ---------------------------------------------------------------------------------------------
# Value sets. all-on turns on every optional feature at once.
cat >"$WORK/all-on.yaml" <<'EOF'
commonLabels: {team: ml-platform}
image: {digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}
imagePullSecrets: [{name: regcred}]
serviceAccount:
  operator: {annotations: {eks.amazonaws.com/role-arn: "arn:aws:iam::123456789012:role/llmo"}}
rbac: {ownerReferencesPermissionEnforcement: true}
operator:
  replicas: 2
  logLevel: "info,llmo_operator=debug"
  resync: 1m30s
  priorityClassName: system-cluster-critical
  podAnnotations: {example.com/a: "1"}
  podLabels: {example.com/b: "2"}
  extraArgs: ["--example=1"]
  extraEnv: [{name: EXTRA, value: "1"}]
  nodeSelector: {kubernetes.io/os: linux}
  tolerations: [{key: dedicated, operator: Equal, value: infra, effect: NoSchedule}]
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector: {matchLabels: {app.kubernetes.io/component: operator}}
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: topology.kubernetes.io/zone
      whenUnsatisfiable: ScheduleAnyway
      labelSelector: {matchLabels: {app.kubernetes.io/component: operator}}
  extraVolumes: [{name: tmp, emptyDir: {}}]
  extraVolumeMounts: [{name: tmp, mountPath: /tmp}]
  podDisruptionBudget: {enabled: true, minAvailable: 1}
serving:
  env:
    HF_ENDPOINT: https://hf-mirror.internal.example.com
    HF_HUB_OFFLINE: 1
    NO_PROXY: .svc,.cluster.local
agent:
  simulate: true
  interval: 15s
  heartbeat: 10m
  cpuClass: cpu
  runtimeClassName: nvidia
  priorityClassName: system-node-critical
  extraArgs: ["--memory-threshold-mib=1024"]
metrics:
  service: {annotations: {prometheus.io/scrape: "true"}}
  serviceMonitor:
    enabled: true
    force: true
    labels: {release: kube-prometheus-stack}
    servingNamespaces: [inference]
grafana:
  dashboard: {enabled: true, annotations: {grafana_folder: LLM}}
EOF
cat >"$WORK/monitoring.yaml" <<'EOF'
metrics: {serviceMonitor: {enabled: true, force: true}}
grafana: {dashboard: {enabled: true}}
EOF

# ---------------------------------------------------------------------------------------------
section "helm lint --strict"
lint() { # name, args...
    local name=$1; shift
    if out="$("$HELM" lint --strict "$CHART" "$@" 2>&1)"; then
        ok "lint $name"
    else
        printf '%s\n' "$out" | sed 's/^/        /'
        bad "lint $name"
    fi
}
lint "defaults"
lint "every optional feature on" -f "$WORK/all-on.yaml"
lint "every optional feature on, Kubernetes 1.20.2" -f "$WORK/all-on.yaml" --kube-version 1.20.2

# ---------------------------------------------------------------------------------------------
section "helm template"
mkdir -p "$WORK/render"
CASES=()
render() { # name, args...
    local name=$1; shift
    if "$HELM" template llmo "$CHART" --namespace llmo-system "$@" >"$WORK/render/$name.yaml" 2>"$WORK/render/$name.err"; then
        CASES+=("$name")
        ok "template $name ($(grep -c '^kind: ' "$WORK/render/$name.yaml") objects)"
    else
        sed 's/^/        /' "$WORK/render/$name.err"
        bad "template $name"
    fi
}
render defaults
render monitoring -f "$WORK/monitoring.yaml"
render monitoring-api --set metrics.serviceMonitor.enabled=true --api-versions monitoring.coreos.com/v1
render monitoring-no-api --set metrics.serviceMonitor.enabled=true
render agent-off --set agent.enabled=false
render crds-off --set crds.enabled=false --set gpuClasses.hook=false
render kube-1.20 --kube-version 1.20.2
render kube-1.24 --kube-version 1.24.17
render kube-1.25 --kube-version 1.25.0
render cel-never --set crds.cel=never
render cel-always --kube-version 1.20.2 --set crds.cel=always
render all-on -f "$WORK/all-on.yaml"
render all-on-1.20 -f "$WORK/all-on.yaml" --kube-version 1.20.2

# The brief's grep-level assertion on the CRD flavour, kept literal.
if [[ -f "$WORK/render/kube-1.20.yaml" ]]; then
    if [[ "$(grep -c '^kind: CustomResourceDefinition' "$WORK/render/kube-1.20.yaml")" == 3 ]] &&
        ! grep -q 'x-kubernetes-validations' "$WORK/render/kube-1.20.yaml"; then
        ok "kube 1.20.2: 3 CRDs, no x-kubernetes-validations (grep)"
    else
        bad "kube 1.20.2: expected 3 CRDs and no x-kubernetes-validations"
    fi
    if grep -q 'x-kubernetes-validations' "$WORK/render/defaults.yaml"; then
        ok "helm's default Kubernetes version: CRDs carry x-kubernetes-validations (grep)"
    else
        bad "default render: expected x-kubernetes-validations in the CRDs"
    fi
fi

# ---------------------------------------------------------------------------------------------
section "assertions on the rendered objects"
if $PY - "$WORK/render" "$ROOT" >"$WORK/assert.out" 2>&1 <<'PY'; then :; fi
import json, os, re, sys
import yaml

render_dir, root = sys.argv[1], sys.argv[2]
failures = 0
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: several times faster

def check(cond, what):
    global failures
    print(("  ok    " if cond else "  FAIL  ") + what)
    if not cond:
        failures += 1

def load(case):
    path = os.path.join(render_dir, case + ".yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=LOADER) if d]

def kinds(docs):
    return sorted({d["kind"] for d in docs})

def find(docs, kind, name_suffix=""):
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]

def one(docs, kind, name_suffix=""):
    found = find(docs, kind, name_suffix)
    return found[0] if len(found) == 1 else None

def container(workload):
    return workload["spec"]["template"]["spec"]["containers"][0]

def crd_source(flavour, name):
    sub = "" if flavour == "cel" else "without-cel"
    with open(os.path.join(root, "crds", sub, name + ".yaml")) as f:
        return yaml.load(f, Loader=LOADER)

def has_cel(obj):
    if isinstance(obj, dict):
        return "x-kubernetes-validations" in obj or any(has_cel(v) for v in obj.values())
    if isinstance(obj, list):
        return any(has_cel(v) for v in obj)
    return False

CRD_NAMES = ["modeldeployments.llmo.dev", "gpuclasses.llmo.dev", "gpunodes.llmo.dev"]

def crd_flavour_is(docs, flavour, label):
    crds = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    check(sorted(crds) == sorted(CRD_NAMES), f"{label}: the three llmo CRDs")
    same = True
    for name, crd in crds.items():
        meta = dict(crd["metadata"])
        meta.pop("labels", None)
        meta.pop("annotations", None)
        stripped = dict(crd, metadata=meta)
        if stripped != crd_source(flavour, name):
            same = False
    check(same, f"{label}: CRDs equal crds/{'' if flavour == 'cel' else 'without-cel/'} but for the chart's labels and annotations")
    check(any(has_cel(c) for c in crds.values()) == (flavour == "cel"),
          f"{label}: {'with' if flavour == 'cel' else 'without'} CEL rules")

# --- defaults -------------------------------------------------------------------------------
d = load("defaults")
if d:
    check(kinds(d) == sorted(["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "DaemonSet",
                              "Deployment", "GPUClass", "Role", "RoleBinding", "Service", "ServiceAccount"]),
          "defaults: kinds " + ", ".join(kinds(d)))
    crd_flavour_is(d, "cel", "defaults")
    check(all(c["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep"
              for c in find(d, "CustomResourceDefinition")), "defaults: CRDs annotated helm.sh/resource-policy: keep")
    dep = one(d, "Deployment", "-operator")
    check(dep is not None, "defaults: one operator Deployment")
    if dep:
        c = container(dep)
        check(c["image"] == "ghcr.io/llmo-dev/llmo-operator:0.1.0", f"operator image {c['image']}")
        check(c["args"] == ["run", "--metrics-addr=0.0.0.0:8080", "--leader-elect=true",
                            "--lease-name=llmo-operator", "--lease-namespace=$(POD_NAMESPACE)", "--resync=5m"],
              "operator args: " + " ".join(c["args"]))
        env = {e["name"]: e for e in c["env"]}
        check(env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
              and env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
              and env["RUST_LOG"]["value"] == "info", "operator env: POD_NAME, POD_NAMESPACE (downward API), RUST_LOG")
        check(c["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}], "operator port 8080 named metrics")
        check(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
              and c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, "probes: /healthz and /readyz on metrics")
        check(dep["spec"]["replicas"] == 1, "operator replicas 1")
        check("requests" in c.get("resources", {}) and "memory" in c["resources"].get("limits", {}),
              "operator resources: requests and a memory limit")
    ds = one(d, "DaemonSet", "-agent")
    check(ds is not None, "defaults: one agent DaemonSet")
    if ds:
        c = container(ds)
        check(c["args"] == ["agent", "--node-name=$(NODE_NAME)", "--interval=10s", "--heartbeat=5m"],
              "agent args: " + " ".join(c["args"]))
        env = {e["name"]: e for e in c["env"]}
        check(env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", "agent NODE_NAME from spec.nodeName")
        check(env.get("NVIDIA_VISIBLE_DEVICES", {}).get("value") == "all"
              and env.get("NVIDIA_DRIVER_CAPABILITIES", {}).get("value") == "utility",
              "agent env NVIDIA_VISIBLE_DEVICES=all, NVIDIA_DRIVER_CAPABILITIES=utility")
        pod = ds["spec"]["template"]["spec"]
        check(pod.get("nodeSelector") == {"nvidia.com/gpu.present": "true"}, "agent nodeSelector nvidia.com/gpu.present=true")
        check(pod.get("tolerations") == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
              "agent tolerates nvidia.com/gpu:NoSchedule")
        check("nvidia.com/gpu" not in json.dumps(c.get("resources", {})), "agent requests no nvidia.com/gpu")
    # Secure pod defaults, on every pod.
    for w in find(d, "Deployment") + find(d, "DaemonSet"):
        pod = w["spec"]["template"]["spec"]
        psc, csc = pod.get("securityContext", {}), container(w).get("securityContext", {})
        name = w["metadata"]["name"]
        check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532
              and psc.get("seccompProfile") == {"type": "RuntimeDefault"},
              f"{name}: pod runAsNonRoot, runAsUser 65532, seccomp RuntimeDefault")
        check(csc.get("allowPrivilegeEscalation") is False and csc.get("readOnlyRootFilesystem") is True
              and csc.get("capabilities") == {"drop": ["ALL"]} and not csc.get("privileged"),
              f"{name}: container no privilege escalation, read-only root, drops ALL, not privileged")
        check(pod.get("automountServiceAccountToken") is True, f"{name}: mounts its token (it talks to the API)")
        check(not pod.get("hostNetwork") and not pod.get("hostPID") and not any("hostPath" in v for v in pod.get("volumes", [])),
              f"{name}: no host network, PID or hostPath")
    check(all(sa.get("automountServiceAccountToken") is False for sa in find(d, "ServiceAccount")),
          "service accounts do not automount tokens")

    # Exact RBAC: least privilege. A change here must be deliberate.
    def rules(obj):
        out = set()
        for r in obj["rules"]:
            for g in r["apiGroups"]:
                for res in r["resources"]:
                    for v in r["verbs"]:
                        out.add((g, res, v, ",".join(r.get("resourceNames", []))))
        return out
    def expand(spec):
        out = set()
        for g, res, verbs, names in spec:
            for v in verbs.split():
                out.add((g, res, v, names))
        return out
    crd_names = ",".join(CRD_NAMES)
    want_operator = expand([
        ("llmo.dev", "modeldeployments", "get list watch", ""),
        ("llmo.dev", "modeldeployments/status", "get patch update", ""),
        ("llmo.dev", "gpuclasses", "get list watch", ""),
        ("llmo.dev", "gpunodes", "get list watch", ""),
        ("", "pods", "get list watch create patch delete deletecollection", ""),
        ("", "services", "get list watch create patch delete", ""),
        ("events.k8s.io", "events", "create patch", ""),
        ("", "events", "create patch", ""),
        ("apiextensions.k8s.io", "customresourcedefinitions", "get", crd_names),
    ])
    want_agent = expand([
        ("llmo.dev", "gpuclasses", "get list watch", ""),
        ("", "nodes", "get list watch patch", ""),
        ("llmo.dev", "gpunodes", "get create patch", ""),
        ("llmo.dev", "gpunodes/status", "patch", ""),
    ])
    want_lease = expand([
        ("coordination.k8s.io", "leases", "create", ""),
        ("coordination.k8s.io", "leases", "get update", "llmo-operator"),
    ])
    cr_op, cr_agent = one(d, "ClusterRole", "-operator"), one(d, "ClusterRole", "-agent")
    role = one(d, "Role", "-leader-election")
    check(cr_op is not None and rules(cr_op) == want_operator, "operator ClusterRole: exactly the expected rules")
    if cr_op and rules(cr_op) != want_operator:
        print("        extra:", sorted(rules(cr_op) - want_operator), "missing:", sorted(want_operator - rules(cr_op)))
    check(cr_agent is not None and rules(cr_agent) == want_agent, "agent ClusterRole: exactly the expected rules")
    if cr_agent and rules(cr_agent) != want_agent:
        print("        extra:", sorted(rules(cr_agent) - want_agent), "missing:", sorted(want_agent - rules(cr_agent)))
    check(role is not None and rules(role) == want_lease and role["metadata"]["namespace"] == "llmo-system",
          "leader-election Role in the release namespace: leases create, get/update of its own Lease")
    wildcard = any("*" in json.dumps(r) for o in find(d, "ClusterRole") + find(d, "Role") for r in o["rules"])
    check(not wildcard, "no wildcard in any RBAC rule")
    for b in find(d, "ClusterRoleBinding") + find(d, "RoleBinding"):
        check(b["subjects"][0]["namespace"] == "llmo-system", f"{b['kind']} {b['metadata']['name']} binds a service account of the release namespace")
    # GPU classes: the examples' classes, created from a hook.
    with open(os.path.join(root, "examples", "gpuclasses.yaml")) as f:
        examples = {e["metadata"]["name"]: e["spec"] for e in yaml.safe_load_all(f) if e}
    classes = {g["metadata"]["name"]: g["spec"] for g in find(d, "GPUClass")}
    check(classes == examples, "GPUClasses equal examples/gpuclasses.yaml (" + ", ".join(classes) + ")")
    check(all(g["metadata"]["annotations"].get("helm.sh/hook") == "post-install,post-upgrade" for g in find(d, "GPUClass")),
          "GPUClasses are post-install/post-upgrade hooks")
    check(not any(d2["kind"] in ("ServiceMonitor", "PodMonitor") for d2 in d) and not find(d, "ConfigMap"),
          "defaults: no monitors, no dashboard")

# --- monitoring -----------------------------------------------------------------------------
m = load("monitoring")
if m:
    sm, pm = one(m, "ServiceMonitor"), one(m, "PodMonitor")
    check(sm is not None and sm["spec"]["endpoints"][0]["port"] == "metrics", "monitoring: ServiceMonitor on port metrics")
    svc = one(m, "Service", "-operator-metrics")
    if sm and svc:
        check(all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()),
              "ServiceMonitor selects the metrics Service")
    check(pm is not None and pm["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") == "llmo-serve"
          and pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"
          and pm["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
          and pm["spec"]["namespaceSelector"] == {"any": True},
          "monitoring: PodMonitor for app.kubernetes.io/name=llmo-serve, port http, /metrics, every namespace")
    cm = one(m, "ConfigMap", "-dashboard")
    check(cm is not None and cm["metadata"]["labels"].get("grafana_dashboard") == "1", "monitoring: dashboard ConfigMap labelled grafana_dashboard: \"1\"")
    if cm:
        with open(os.path.join(root, "charts", "llmo", "dashboards", "llmo.json")) as f:
            check(json.loads(cm["data"]["llmo.json"]) == json.load(f), "dashboard ConfigMap holds dashboards/llmo.json")
ma, mn = load("monitoring-api"), load("monitoring-no-api")
if ma and mn:
    check(one(ma, "ServiceMonitor") is not None and one(ma, "PodMonitor") is not None,
          "monitors rendered when the cluster serves monitoring.coreos.com/v1")
    check(not find(mn, "ServiceMonitor") and not find(mn, "PodMonitor"),
          "monitors skipped when monitoring.coreos.com/v1 is missing and not forced")

# --- agent off, CRDs off ------------------------------------------------------------------------
a = load("agent-off")
if a:
    check(not find(a, "DaemonSet") and not find(a, "ClusterRole", "-agent") and not find(a, "ServiceAccount", "-agent"),
          "agent off: no DaemonSet, agent ClusterRole or service account")
    check(one(a, "Deployment", "-operator") is not None, "agent off: the operator stays")
c = load("crds-off")
if c:
    check(not find(c, "CustomResourceDefinition"), "crds off: no CRDs")
    check(all("helm.sh/hook" not in g["metadata"].get("annotations", {}) for g in find(c, "GPUClass")) and find(c, "GPUClass"),
          "crds off, gpuClasses.hook=false: GPUClasses are plain release objects")

# --- CRD flavour by Kubernetes version --------------------------------------------------------
for case, flavour in [("kube-1.20", "without-cel"), ("kube-1.24", "without-cel"), ("kube-1.25", "cel"),
                      ("cel-never", "without-cel"), ("cel-always", "cel")]:
    docs = load(case)
    if docs:
        crd_flavour_is(docs, flavour, case)

# --- every optional feature -------------------------------------------------------------------
o = load("all-on")
if o:
    dep, ds = one(o, "Deployment", "-operator"), one(o, "DaemonSet", "-agent")
    args = container(dep)["args"]
    check(dep["spec"]["replicas"] == 2, "all-on: 2 operator replicas")
    check(args[:6] == ["run", "--metrics-addr=0.0.0.0:8080", "--leader-elect=true", "--lease-name=llmo-operator",
                       "--lease-namespace=$(POD_NAMESPACE)", "--resync=1m30s"]
          and "--serving-env=HF_ENDPOINT=https://hf-mirror.internal.example.com" in args
          and "--serving-env=HF_HUB_OFFLINE=1" in args and "--serving-env=NO_PROXY=.svc,.cluster.local" in args
          and args[-1] == "--example=1",
          "all-on: operator args with one --serving-env per serving.env entry")
    check(container(dep)["image"].endswith("@sha256:" + "0123456789abcdef" * 4), "all-on: image pinned by digest")
    aargs = container(ds)["args"]
    check(aargs == ["agent", "--node-name=$(NODE_NAME)", "--simulate-from-node", "--interval=15s", "--heartbeat=10m",
                    "--cpu-class=cpu", "--memory-threshold-mib=1024"], "all-on: agent args " + " ".join(aargs))
    check(ds["spec"]["template"]["spec"].get("runtimeClassName") == "nvidia", "all-on: agent runtimeClassName nvidia")
    pdb = one(o, "PodDisruptionBudget")
    check(pdb is not None and pdb["apiVersion"] == "policy/v1", "all-on: PodDisruptionBudget policy/v1")
    o20 = load("all-on-1.20")
    if o20:
        pdb20 = one(o20, "PodDisruptionBudget")
        check(pdb20 is not None and pdb20["apiVersion"] == "policy/v1beta1", "all-on, 1.20: PodDisruptionBudget policy/v1beta1")
    cr = one(o, "ClusterRole", "-operator")
    check(any(r["resources"] == ["modeldeployments/finalizers"] and r["verbs"] == ["update"] for r in cr["rules"]),
          "all-on: modeldeployments/finalizers update with ownerReferencesPermissionEnforcement")
    pm = one(o, "PodMonitor")
    check(pm is not None and pm["spec"]["namespaceSelector"] == {"matchNames": ["inference"]}
          and pm["metadata"]["labels"].get("release") == "kube-prometheus-stack",
          "all-on: PodMonitor limited to servingNamespaces, with the extra labels")
    check(all(x["metadata"]["labels"].get("team") == "ml-platform" for x in o), "all-on: commonLabels on every object")

print(f"ASSERT_FAILURES={failures}")
PY
sed '/^ASSERT_FAILURES=/d' "$WORK/assert.out"
n="$(sed -n 's/^ASSERT_FAILURES=//p' "$WORK/assert.out")"
if [[ -z "$n" ]]; then
    bad "assertion script crashed"
else
    passed=$((passed + $(grep -c '^  ok ' "$WORK/assert.out" || true)))
    failed=$((failed + n))
    while IFS= read -r line; do failures+=("${line#  FAIL  }"); done < <(grep '^  FAIL ' "$WORK/assert.out" || true)
fi

# ---------------------------------------------------------------------------------------------
section "bad values are refused"
refuse() { # what, expected message (grep -E), helm args...
    local what=$1 expect=$2; shift 2
    local out
    if out="$("$HELM" template llmo "$CHART" "$@" 2>&1)"; then
        bad "accepted: $what"
    elif grep -qE -- "$expect" <<<"$out"; then
        ok "refused: $what"
    else
        printf '%s\n' "$out" | sed 's/^/        /' | head -5
        bad "refused for another reason: $what (wanted /$expect/)"
    fi
}
refuse "operator.replicas=-1" "operator.replicas: Must be greater than or equal to 0" --set operator.replicas=-1
refuse "an unknown top-level key" "Additional property bogus is not allowed" --set bogus=1
refuse "an unknown nested key (operator.replica)" "operator: Additional property replica is not allowed" --set operator.replica=2
refuse "crds.cel=maybe" "crds.cel: crds.cel must be one of" --set crds.cel=maybe
refuse "image.pullPolicy=Sometimes" "image.pullPolicy" --set image.pullPolicy=Sometimes
refuse "operator.resync=5 minutes" "operator.resync: Does not match pattern" --set "operator.resync=5 minutes"
refuse "agent.interval=10" "agent.interval: Invalid type" --set agent.interval=10
refuse "serving.env with a reserved LLMO_ name" "serving.env: Must not validate the schema" --set serving.env.LLMO_MODEL=x
refuse "serving.env with a name that is no variable name" "serving.env: Property name of \"A-B\" does not match" --set serving.env.A-B=x
refuse "metrics.port=70000" "metrics.port: Must be less than or equal to 65535" --set metrics.port=70000
refuse "agent.enabled=yes (a string)" "agent.enabled: Invalid type" --set-string agent.enabled=yes
refuse "a GPU class without a name" "gpuClasses.items.0: name is required" --set-json 'gpuClasses.items=[{"spec":{"device":"gpu","memory":"80Gi"}}]'
refuse "two operators without leader election" "needs operator.leaderElection.enabled=true" \
    --set operator.replicas=2 --set operator.leaderElection.enabled=false
refuse "monitors without the metrics Service" "needs metrics.service.enabled" \
    --set metrics.serviceMonitor.enabled=true --set metrics.serviceMonitor.force=true --set metrics.service.enabled=false

# ---------------------------------------------------------------------------------------------
section "kubernetes-validate (offline schemas; custom kinds are skipped)"
# Two runs, one per Kubernetes version: the newest for every render, the oldest for the 1.20
# renders and again for the default and all-on renders.
total_valid=0
total_skipped=0
newest=() oldest=()
for name in "${CASES[@]}"; do
    if [[ "$name" == *1.20* ]]; then
        oldest+=("$WORK/render/$name.yaml")
    else
        newest+=("$WORK/render/$name.yaml")
        if [[ "$name" == defaults || "$name" == all-on ]]; then oldest+=("$WORK/render/$name.yaml"); fi
    fi
done
kv_run() { # version, files...
    local version=$1; shift
    [[ $# -gt 0 ]] || return 0
    local out rc=0
    out="$($PY -m kubernetes_validate --strict -k "$version" "$@" 2>&1)" || rc=$?
    local f name valid skipped errors
    for f in "$@"; do
        name="$(basename "$f" .yaml)"
        valid="$(grep -c "^INFO $f passed" <<<"$out" || true)"
        skipped="$(grep -c "^WARN $f Couldn't find schema" <<<"$out" || true)"
        errors="$(grep "$f" <<<"$out" | grep -v "^INFO $f passed" | grep -v "^WARN $f Couldn't find schema" || true)"
        total_valid=$((total_valid + valid))
        total_skipped=$((total_skipped + skipped))
        if [[ -z "$errors" ]]; then
            ok "$name @ $version: $valid valid, $skipped skipped (custom kinds)"
        else
            sed 's/^/        /' <<<"$errors" | head -20
            bad "kubernetes-validate $name @ $version"
        fi
    done
    if [[ $rc -ne 0 ]] && ! grep -q -v -e '^INFO ' -e "Couldn't find schema" <<<"$out"; then
        printf '%s\n' "$out" | tail -5 | sed 's/^/        /'
        bad "kubernetes-validate exited $rc @ $version"
    fi
}
kv_run "$KV_LATEST" "${newest[@]}"
kv_run "$KV_OLDEST" "${oldest[@]}"

# ---------------------------------------------------------------------------------------------
section "Grafana dashboard and documentation"
if $PY - "$ROOT" >"$WORK/docs.out" 2>&1 <<'PY'; then :; fi
import json, os, re, sys
import yaml

root = sys.argv[1]
chart = os.path.join(root, "charts", "llmo")
failures = 0

def check(cond, what):
    global failures
    print(("  ok    " if cond else "  FAIL  ") + what)
    if not cond:
        failures += 1

# --- the dashboard ---------------------------------------------------------------------------
with open(os.path.join(chart, "dashboards", "llmo.json")) as f:
    dash = json.load(f)
panels = [p for p in dash["panels"] if p["type"] != "row"]
exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
check(dash.get("uid") and dash.get("title") and len(panels) >= 8, f"dashboard: {len(panels)} panels, uid {dash.get('uid')}")

# Metric names llmo-serve registers (prometheus-client appends _total to counters and
# _bucket/_sum/_count to histograms).
def exported(names):
    out = set()
    for name in names:
        out |= {name, name + "_total", name + "_bucket", name + "_sum", name + "_count"}
    return out

with open(os.path.join(root, "serving", "src", "metrics.rs")) as f:
    serving_names = re.findall(r'register\(\s*"(llmo_[a-z_]+)"', f.read())
# The operator's: registered in a Registry::with_prefix("llmo_operator") in operator/src.
operator_names = []
for dirpath, _, files in os.walk(os.path.join(root, "operator", "src")):
    for fn in files:
        if fn.endswith(".rs"):
            with open(os.path.join(dirpath, fn)) as f:
                text = f.read()
            if 'with_prefix("llmo_operator")' in text:
                operator_names += ["llmo_operator_" + n for n in re.findall(r'register\(\s*"([a-z_]+)"', text)]
if not operator_names:
    # Not in the source yet: the names the operator's metrics are specified to have.
    operator_names = ["llmo_operator_reconciles", "llmo_operator_reconcile_duration_seconds",
                      "llmo_operator_groups", "llmo_operator_deployment_replicas"]
    print("  note  operator/src registers no llmo_operator_* metric yet: checked against the specified names")
known = exported(serving_names) | exported(operator_names)
used = set()
for e in exprs:
    used |= set(re.findall(r"\b(llmo_[a-z_]+)\b", e))
unknown = sorted(used - known)
check(serving_names and not unknown,
      f"dashboard names only exported metrics ({len(used)} names; {len(serving_names)} from llmo-serve, "
      f"{len(operator_names)} from the operator)" + (f"; unknown: {unknown}" if unknown else ""))
for want in ["llmo_time_to_first_token_seconds_bucket", "llmo_inter_token_latency_seconds_bucket",
             "llmo_prompt_tokens_total", "llmo_generation_tokens_total", "llmo_kv_cache_usage_ratio",
             "llmo_requests_running", "llmo_requests_waiting", "llmo_operator_deployment_replicas",
             "llmo_operator_reconciles_total", "llmo_operator_reconcile_duration_seconds_bucket",
             "llmo_operator_groups"]:
    check(want in used, f"dashboard plots {want}")
check(all("histogram_quantile" in e for e in exprs if "_bucket" in e), "histograms are read through histogram_quantile over _bucket")

try:
    import promql_parser
except ImportError:
    promql_parser = None
    print("  note  promql-parser not installed: PromQL syntax not checked")
if promql_parser:
    bad = []
    for e in exprs:
        concrete = e.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$deployment", ".*")
        try:
            promql_parser.parse(concrete)
        except Exception as err:  # noqa: BLE001
            bad.append(f"{e}: {err}")
    check(not bad, f"dashboard: all {len(exprs)} PromQL expressions parse" + ("".join("\n        " + b for b in bad)))

# --- every schema property has a description; every value a comment ----------------------------
with open(os.path.join(chart, "values.schema.json")) as f:
    schema = json.load(f)
undocumented = []
def walk(node, path):
    for key, sub in node.get("properties", {}).items():
        p = path + [key]
        if "description" not in sub and path[-1:] != ["resources"]:
            undocumented.append(".".join(p))
        walk(sub, p)
        if isinstance(sub.get("items"), dict):
            walk(sub["items"], p + ["[]"])
walk(schema, [])
check(not undocumented, "every schema property has a description" + (f"; missing: {undocumented}" if undocumented else ""))

def schema_node(path):
    node = schema
    for key in path:
        node = node.get("properties", {}).get(key)
        if node is None:
            return None
    return node

with open(os.path.join(chart, "values.yaml")) as f:
    lines = f.read().splitlines()
stack = []  # (indent, key)
uncommented = []
keys = 0
for i, line in enumerate(lines):
    m = re.match(r"^( *)([A-Za-z_][A-Za-z0-9_.-]*):( |$)", line)
    if not m:
        continue
    indent, key = len(m.group(1)), m.group(2)
    while stack and stack[-1][0] >= indent:
        stack.pop()
    path = [k for _, k in stack] + [key]
    stack.append((indent, key))
    node = schema_node(path)
    if node is None or "description" not in node:
        continue  # a value inside a map or Kubernetes object, not a chart value
    keys += 1
    j = i - 1
    while j >= 0 and lines[j].strip() == "":
        j -= 1
    if j < 0 or not lines[j].lstrip().startswith("#"):
        uncommented.append(".".join(path))
check(not uncommented, f"values.yaml: all {keys} values have a comment above them" + (f"; missing: {uncommented}" if uncommented else ""))

# values.yaml and the schema agree on the keys (the schema refuses unknown ones, so this finds
# schema properties with no default in values.yaml).
with open(os.path.join(chart, "values.yaml")) as f:
    values = yaml.safe_load(f)
missing = []
def walk_values(node, path):
    for key, sub in node.get("properties", {}).items():
        p = path + [key]
        if key in ("global",) or path[-1:] == ["resources"]:
            continue
        v = values
        for k in p:
            v = v.get(k) if isinstance(v, dict) else None
        if v is None and not any(x in p for x in ("items",)):
            missing.append(".".join(p))
        elif sub.get("additionalProperties") is False:
            walk_values(sub, p)
walk_values(schema, [])
check(not missing, "every schema property has a default in values.yaml" + (f"; missing: {missing}" if missing else ""))

# The README's values table names every value.
with open(os.path.join(chart, "README.md")) as f:
    readme = f.read()
leaves = []
def walk_leaves(node, path):
    for key, sub in node.get("properties", {}).items():
        if key == "global":
            continue
        p = path + [key]
        if sub.get("type") == "object" and sub.get("additionalProperties") is False and key != "resources":
            walk_leaves(sub, p)
        else:
            leaves.append(".".join(p))
walk_leaves(schema, [])
absent = [l for l in leaves if f"| `{l}` |" not in readme]
check(not absent, f"README values table lists all {len(leaves)} values" + (f"; missing: {absent}" if absent else ""))

# Every RBAC rule says what uses it: a comment right above each rule.
silent = []
for fn in sorted(os.listdir(os.path.join(chart, "templates"))):
    if "rbac" not in fn:
        continue
    with open(os.path.join(chart, "templates", fn)) as f:
        tl = f.read().splitlines()
    for i, line in enumerate(tl):
        if line.strip().startswith("- apiGroups:"):
            j = i - 1
            while j >= 0 and (not tl[j].strip() or tl[j].strip().startswith("{{")):
                j -= 1
            if j < 0 or not tl[j].strip().startswith("#"):
                silent.append(f"{fn}:{i + 1}")
check(not silent, "every RBAC rule has a comment saying what uses it" + (f"; missing: {silent}" if silent else ""))

print(f"ASSERT_FAILURES={failures}")
PY
sed '/^ASSERT_FAILURES=/d' "$WORK/docs.out"
n="$(sed -n 's/^ASSERT_FAILURES=//p' "$WORK/docs.out")"
if [[ -z "$n" ]]; then
    bad "documentation check crashed"
else
    passed=$((passed + $(grep -c '^  ok ' "$WORK/docs.out" || true)))
    failed=$((failed + n))
    while IFS= read -r line; do failures+=("${line#  FAIL  }"); done < <(grep '^  FAIL ' "$WORK/docs.out" || true)
fi

# ---------------------------------------------------------------------------------------------
section "summary"
echo "  $passed passed, $failed failed; ${#CASES[@]} renders, $total_valid objects validated by kubernetes-validate, $total_skipped custom objects skipped"
for n in "${notes[@]}"; do echo "  note: $n"; done
if [[ $failed -ne 0 ]]; then
    for f in "${failures[@]}"; do echo "  FAILED: $f"; done
    exit 1
fi
echo "  chart OK"
