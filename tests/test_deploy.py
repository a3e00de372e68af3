"""Deployment artefacts: Dockerfile, Helm chart, Prometheus rules, Grafana dashboard.

Runs the real tools: helm (from .tools/, `make install-test`), kubernetes-validate's bundled
schemas, hadolint, and promtool where installed (Debian package `prometheus`).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.support import dockerfile
from tests.support.helm import (
    CHART,
    CI_VALUES,
    HelmError,
    env_of,
    find,
    helm_binary,
    one,
    pod_templates,
    render,
    run_helm,
)
from tests.support.metric_catalog import (
    MetricDef,
    defined_metrics,
    exposition_index,
    label_problems,
    used_metrics,
)
from tests.support.procs import REPO_ROOT
from tests.support.tools import requires

OPS = REPO_ROOT / "ops"
ALERTS = OPS / "prometheus" / "alerts.yaml"
ALERT_TESTS = OPS / "prometheus" / "alerts_test.yaml"
DASHBOARD = OPS / "grafana" / "moshimoshi.json"
DOCKERFILE = REPO_ROOT / "Dockerfile"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
PROMTOOL = shutil.which("promtool")
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one.
K8S_VERSIONS = ("1.26", "1.33")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
FULLNAME = "t-moshimoshi"

# The worker's metrics as the contract names them, used only while service/worker/metrics.py
# does not exist yet (once it does, its definitions are read from the source).
CONTRACT_WORKER_METRICS = [
    MetricDef("moshimoshi_worker_step_duration_seconds", "histogram", frozenset()),
    MetricDef("moshimoshi_worker_slots", "gauge", frozenset()),
    MetricDef("moshimoshi_worker_slots_busy", "gauge", frozenset()),
    MetricDef("moshimoshi_worker_slot_underruns_total", "counter", None),
    MetricDef("moshimoshi_worker_input_dropped_total", "counter", None),
    MetricDef("moshimoshi_worker_step_overruns_total", "counter", None),
    MetricDef("moshimoshi_worker_sessions_total", "counter", frozenset({"outcome"})),
    MetricDef("moshimoshi_worker_ready", "gauge", frozenset()),
]

pytestmark = [pytest.mark.system, requires(helm_binary() is not None, "helm is not installed")]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Every CI values file rendered once: {file stem: manifests}."""
    return {path.stem: render(path) for path in CI_VALUES}


@pytest.fixture(scope="module")
def default(rendered) -> list[dict]:
    return rendered["default-values"]


@pytest.fixture(scope="module")
def external(rendered) -> list[dict]:
    return rendered["external-redis-values"]


@pytest.fixture(scope="module")
def loadbalancer(rendered) -> list[dict]:
    return rendered["loadbalancer-no-operator-values"]


def container(docs: list[dict], kind: str, name: str) -> dict:
    return one(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]


def gateway(docs: list[dict]) -> dict:
    return container(docs, "Deployment", f"{FULLNAME}-gateway")


def worker(docs: list[dict]) -> dict:
    return container(docs, "StatefulSet", f"{FULLNAME}-worker")


def secret_value(docs: list[dict], ref: dict) -> str:
    """The decoded value a secretKeyRef points at, from a Secret the chart rendered."""
    key_ref = ref["valueFrom"]["secretKeyRef"]
    secret = one(docs, "Secret", key_ref["name"])
    return base64.b64decode(secret["data"][key_ref["key"]]).decode()


def test_ci_values_files_cover_the_three_setups():
    assert {p.stem for p in CI_VALUES} >= {"default-values", "external-redis-values", "loadbalancer-no-operator-values"}


# ----------------------------------------------------------------------------- helm lint, schemas


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_helm_lint(values):
    out = run_helm("lint", "--strict", str(CHART), "-f", str(values))
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_manifests_match_kubernetes_schemas(rendered, values, k8s):
    docs = rendered[values.stem]
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, k8s, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']} (k8s {k8s}): {exc.message} at {'.'.join(map(str, exc.path))}"
            )
        checked += 1
    assert checked >= 8


def test_schema_validation_catches_a_misspelled_field():
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "replica": 2,
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_service_monitors_select_a_service_port(default, external):
    for docs in (default, external):
        monitors = find(docs, "ServiceMonitor")
        assert {m["metadata"]["name"] for m in monitors} == {f"{FULLNAME}-gateway", f"{FULLNAME}-worker"}
        for monitor in monitors:
            spec = monitor["spec"]
            services = [
                s
                for s in find(docs, "Service")
                if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
                and s["spec"].get("type") != "LoadBalancer"
            ]
            assert services, f"{monitor['metadata']['name']} selects no Service"
            assert spec["namespaceSelector"]["matchNames"] == ["tel"]
            for endpoint in spec["endpoints"]:
                assert endpoint["path"] == "/metrics"
                assert re.fullmatch(r"\d+[sm]", endpoint["interval"])
                for service in services:
                    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    monitor = one(external, "ServiceMonitor", f"{FULLNAME}-worker")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_prometheus_rule_carries_the_ops_alerts(default, external):
    for docs in (default, external):
        rule = one(docs, "PrometheusRule", FULLNAME)
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    assert one(external, "PrometheusRule", FULLNAME)["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_grafana_dashboard_configmap(default, loadbalancer):
    for docs in (default, loadbalancer):
        cm = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"]["moshimoshi.json"]) == json.loads(DASHBOARD.read_text())


def test_without_the_operator_no_crd_objects(loadbalancer):
    assert not find(loadbalancer, "ServiceMonitor")
    assert not find(loadbalancer, "PrometheusRule")
    annotations = one(loadbalancer, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"


# ----------------------------------------------------------------------------- worker


def test_worker_requests_a_gpu(rendered):
    for docs in rendered.values():
        resources = worker(docs)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert resources["requests"]["nvidia.com/gpu"] == "1"


def test_worker_hf_token_comes_from_a_secret(default, external, loadbalancer):
    # Defaults: a public model, no token.
    assert "HF_TOKEN" not in env_of(worker(default))
    # Value in values.yaml: the chart's Secret.
    ref = env_of(worker(external))["HF_TOKEN"]
    assert "value" not in ref
    assert secret_value(external, ref) == "hf_ci_dummy_token"
    # Existing Secret: referenced as given, not rendered.
    key_ref = env_of(worker(loadbalancer))["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": "hf-credentials", "key": "token"}
    assert not find(loadbalancer, "Secret", "hf-credentials")


def test_worker_cache_volume(default, external, loadbalancer):
    for docs in (default, external, loadbalancer):
        mounts = {m["name"]: m["mountPath"] for m in worker(docs)["volumeMounts"]}
        assert mounts["cache"] == "/cache"
        assert env_of(worker(docs))["HF_HOME"]["value"].startswith("/cache/")
    # Default: one PVC per worker from the StatefulSet's claim templates.
    sts = one(default, "StatefulSet", f"{FULLNAME}-worker")
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "cache"
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "cache" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    # A shared existing claim.
    sts = one(external, "StatefulSet", f"{FULLNAME}-worker")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "hf-cache-rwx"
    assert "volumeClaimTemplates" not in sts["spec"]
    # Cache disabled: emptyDir.
    sts = one(loadbalancer, "StatefulSet", f"{FULLNAME}-worker")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["cache"]


def test_worker_env_probes_and_advertise_url(default, external):
    c = worker(default)
    env = env_of(c)
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["MOSHIMOSHI_ADVERTISE_URL"]["value"] == "ws://$(POD_IP):8081"
    names = [e["name"] for e in c["env"]]
    assert names.index("POD_IP") < names.index("MOSHIMOSHI_ADVERTISE_URL"), "$(POD_IP) must be defined first"
    assert env["MOSHIMOSHI_MODEL"]["value"] == "llm-jp/llm-jp-moshi-v1"
    assert "MOSHIMOSHI_SLOTS" not in env
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800, "model download needs a long budget"
    env = env_of(worker(external))
    assert env["MOSHIMOSHI_MODEL"]["value"] == "nu-dialogue/j-moshi-ext"
    assert env["MOSHIMOSHI_SLOTS"]["value"] == "8"
    assert env["MOSHIMOSHI_HF_REVISION"]["value"] == "main"


def test_worker_autoscaling(default, external):
    assert not find(default, "HorizontalPodAutoscaler")
    assert one(default, "StatefulSet", f"{FULLNAME}-worker")["spec"]["replicas"] == 1
    hpa = one(external, "HorizontalPodAutoscaler", f"{FULLNAME}-worker")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": f"{FULLNAME}-worker"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    metric = hpa["metrics"][0]["pods"]
    assert metric["metric"]["name"] == "moshimoshi_worker_slot_utilization"
    assert metric["target"] == {"type": "AverageValue", "averageValue": "700m"}
    # The HPA owns the replica count.
    assert "replicas" not in one(external, "StatefulSet", f"{FULLNAME}-worker")["spec"]


# ----------------------------------------------------------------------------- gateway


def test_gateway_host_network(default):
    deployment = one(default, "Deployment", f"{FULLNAME}-gateway")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert anti["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    c = pod["containers"][0]
    ports = {(p["containerPort"], p["protocol"]) for p in c["ports"]}
    assert {(5060, "UDP"), (5060, "TCP"), (8080, "TCP")} <= ports
    env = env_of(c)
    assert (env["MOSHIMOSHI_RTP_PORT_MIN"]["value"], env["MOSHIMOSHI_RTP_PORT_MAX"]["value"]) == ("20000", "20999")
    assert env["MOSHIMOSHI_PUBLIC_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert not [s for s in find(default, "Service") if s["spec"].get("type") == "LoadBalancer"]


def test_gateway_load_balancer(loadbalancer):
    deployment = one(loadbalancer, "Deployment", f"{FULLNAME}-gateway")
    pod = deployment["spec"]["template"]["spec"]
    assert not pod.get("hostNetwork")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    env = env_of(pod["containers"][0])
    assert env["MOSHIMOSHI_PUBLIC_HOST"]["value"] == "203.0.113.10"
    assert (env["MOSHIMOSHI_RTP_PORT_MIN"]["value"], env["MOSHIMOSHI_RTP_PORT_MAX"]["value"]) == ("20000", "20099")
    lb = one(loadbalancer, "Service", f"{FULLNAME}-sip")["spec"]
    assert lb["type"] == "LoadBalancer"
    assert lb["externalTrafficPolicy"] == "Local"
    assert lb["publishNotReadyAddresses"] is True
    # the gateway's own allow list, plus the addresses that only send RTP
    assert lb["loadBalancerSourceRanges"] == ["198.51.100.0/25", "10.0.0.0/8", "198.51.100.128/25"]
    assert env["MOSHIMOSHI_SIP_ALLOW"]["value"] == "198.51.100.0/25,10.0.0.0/8"
    ports = {(p["port"], p["protocol"]) for p in lb["ports"]}
    assert {(5060, "UDP"), (5060, "TCP"), (5061, "TCP")} <= ports  # SIP over TLS on its own port
    rtp = sorted(p["port"] for p in lb["ports"] if p["name"].startswith("rtp-"))
    assert rtp == list(range(20000, 20100))
    assert all(
        p["protocol"] == "UDP" and p["targetPort"] == p["port"] for p in lb["ports"] if p["name"].startswith("rtp-")
    )


def test_gateway_sip_allow_list_and_rate_limit_default_to_private_ranges_and_pike(default):
    from sip.acl import PRIVATE_NETWORKS

    env = env_of(gateway(default))
    assert env["MOSHIMOSHI_SIP_ALLOW"]["value"].split(",") == list(PRIVATE_NETWORKS)
    assert [env[f"MOSHIMOSHI_SIP_RATE_{k}"]["value"] for k in ("LIMIT", "WINDOW_SECONDS", "BAN_SECONDS")] == [
        "16",
        "2",
        "300",
    ]
    assert "MOSHIMOSHI_SIP_AUTH_FILE" not in env  # no digest unless a Secret is named


def test_load_balancer_source_ranges_leave_loopback_out():
    docs = render(
        None,
        "gateway.networking.mode=loadBalancer",
        "gateway.replicas=1",
        "gateway.networking.publicHost=192.0.2.1",
        "gateway.rtp.portMax=20099",
    )
    lb = one(docs, "Service", f"{FULLNAME}-sip")["spec"]
    assert lb["loadBalancerSourceRanges"] == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]


def test_sip_digest_users_come_from_a_mounted_secret():
    docs = render(None, "gateway.sip.auth.existingSecret=trunk-users", "gateway.sip.auth.algorithms={MD5}")
    pod = one(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    assert env["MOSHIMOSHI_SIP_AUTH_FILE"]["value"] == "/etc/moshimoshi/sip-auth/sip-users"
    assert env["MOSHIMOSHI_SIP_AUTH_ALGORITHMS"]["value"] == "MD5"
    assert "MOSHIMOSHI_SIP_AUTH" not in env  # never in the environment
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "sip-auth")
    assert mount["mountPath"] == "/etc/moshimoshi/sip-auth" and mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == "sip-auth")
    assert volume["secret"]["secretName"] == "trunk-users"
    assert volume["secret"]["items"] == [{"key": "sip-users", "path": "sip-users"}]


def test_sip_over_tls_mounts_the_certificate_secret_and_sets_the_srtp_policy(default, external):
    plain = gateway(default)
    env = env_of(plain)
    assert env["MOSHIMOSHI_SRTP"]["value"] == "optional"
    assert not [name for name in env if name.startswith("MOSHIMOSHI_SIP_TLS")]
    assert not [p for p in plain["ports"] if p["name"] == "sip-tls"]
    secured = gateway(external)
    env = env_of(secured)
    assert env["MOSHIMOSHI_SRTP"]["value"] == "required"
    assert {name: env[name]["value"] for name in env if name.startswith("MOSHIMOSHI_SIP_TLS")} == {
        "MOSHIMOSHI_SIP_TLS_PORT": "5061",
        "MOSHIMOSHI_SIP_TLS_CERT": "/etc/moshimoshi/sip-tls/tls.crt",
        "MOSHIMOSHI_SIP_TLS_KEY": "/etc/moshimoshi/sip-tls/tls.key",
        "MOSHIMOSHI_SIP_TLS_HANDSHAKE_SECONDS": "10",
        "MOSHIMOSHI_SIP_TLS_CLIENT_CA": "/etc/moshimoshi/sip-tls-client-ca/ca.crt",
    }
    assert {"name": "sip-tls", "containerPort": 5061, "protocol": "TCP"} in secured["ports"]
    mounts = {m["name"]: m for m in secured["volumeMounts"]}
    # a directory mount (no subPath): the kubelet swaps a renewed certificate in place
    assert mounts["sip-tls"] == {"name": "sip-tls", "mountPath": "/etc/moshimoshi/sip-tls", "readOnly": True}
    assert "subPath" not in mounts["sip-tls-client-ca"]
    pod = one(external, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["sip-tls"]["secret"] == {"secretName": "sip-gateway-tls", "defaultMode": 0o440}
    assert volumes["sip-tls-client-ca"]["secret"]["secretName"] == "trunk-client-ca"


@pytest.mark.parametrize(
    "sets, message",
    [
        (("gateway.sip.tls.clientCaSecretName=ca",), "needs gateway.sip.tls.secretName"),
        (("gateway.sip.tls.secretName=s", "gateway.sip.tls.port=5060"), "must differ from gateway.sip.port"),
        (("gateway.srtp=always",), "must be off, optional or required"),
    ],
)
def test_bad_tls_and_srtp_values_stop_the_render_with_the_reason(sets, message):
    with pytest.raises(HelmError, match=message):
        render(None, *sets)


def test_gateway_reads_tokens_and_redis_from_secrets(default, external, loadbalancer):
    env = env_of(gateway(external))
    assert secret_value(external, env["MOSHIMOSHI_API_TOKENS"]) == "ci-admin-token:admin,ci-read-token:read"
    assert env["MOSHIMOSHI_MODEL"]["value"] == "nu-dialogue/j-moshi-ext"
    generated = secret_value(default, env_of(gateway(default))["MOSHIMOSHI_API_TOKENS"])
    assert re.fullmatch(r"[A-Za-z0-9]{40}:admin", generated)
    key_ref = env_of(gateway(loadbalancer))["MOSHIMOSHI_API_TOKENS"]["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": "moshimoshi-api", "key": "api-tokens"}


def test_gateways_and_workers_share_one_worker_secret(default, external, loadbalancer):
    for docs in (default, external, loadbalancer):
        refs = [
            env_of(c)["MOSHIMOSHI_WORKER_SECRET"]["valueFrom"]["secretKeyRef"] for c in (gateway(docs), worker(docs))
        ]
        assert refs[0] == refs[1] == {"name": f"{FULLNAME}-worker-secret", "key": "worker-secret"}
        assert re.fullmatch(r"[A-Za-z0-9]{48}", secret_value(docs, env_of(worker(docs))["MOSHIMOSHI_WORKER_SECRET"]))
    given = render(None, "workerSecret.value=0123456789abcdef-given")
    assert secret_value(given, env_of(gateway(given))["MOSHIMOSHI_WORKER_SECRET"]) == "0123456789abcdef-given"
    existing = render(None, "workerSecret.existingSecret=moshimoshi-workers", "workerSecret.existingSecretKey=s")
    assert not find(existing, "Secret", f"{FULLNAME}-worker-secret")
    for c in (gateway(existing), worker(existing)):
        assert env_of(c)["MOSHIMOSHI_WORKER_SECRET"]["valueFrom"]["secretKeyRef"] == {
            "name": "moshimoshi-workers",
            "key": "s",
        }


def policy_ports(policy: dict) -> list[set]:
    return [{p["port"] for p in rule["ports"]} for rule in policy["spec"]["ingress"]]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_network_policies_let_only_gateways_and_prometheus_reach_workers(loadbalancer):
    docs = loadbalancer  # gateways as pods (no hostNetwork): a pod selector finds them
    pod_labels = {
        name: spec["metadata"]["labels"]
        for name, spec in (
            ("gateway", one(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]),
            ("worker", one(docs, "StatefulSet", f"{FULLNAME}-worker")["spec"]["template"]),
            ("redis", one(docs, "StatefulSet", f"{FULLNAME}-redis")["spec"]["template"]),
        )
    }
    workers = one(docs, "NetworkPolicy", f"{FULLNAME}-worker")["spec"]
    assert workers["policyTypes"] == ["Ingress"]
    assert selects(workers["podSelector"], pod_labels["worker"])
    assert not selects(workers["podSelector"], pod_labels["gateway"])
    gateways, prometheus = workers["ingress"]
    assert len(gateways["from"]) == 1 and selects(gateways["from"][0]["podSelector"], pod_labels["gateway"])
    assert not selects(gateways["from"][0]["podSelector"], pod_labels["worker"])  # not worker to worker
    assert prometheus["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    # the named port is the worker's only port: sessions, drain, info and /metrics
    assert [p["name"] for p in worker(docs)["ports"]] == ["http"]
    assert policy_ports(one(docs, "NetworkPolicy", f"{FULLNAME}-worker")) == [{"http"}, {"http"}]

    redis = one(docs, "NetworkPolicy", f"{FULLNAME}-redis")["spec"]
    assert selects(redis["podSelector"], pod_labels["redis"])
    [rule] = redis["ingress"]
    peers = [peer["podSelector"] for peer in rule["from"]]
    assert [selects(p, pod_labels["gateway"]) for p in peers] == [True, False]
    assert [selects(p, pod_labels["worker"]) for p in peers] == [False, True]
    assert {p["port"] for p in rule["ports"]} == {"redis"}
    assert "redis" in [p["name"] for p in container(docs, "StatefulSet", f"{FULLNAME}-redis")["ports"]]


def test_network_policies_with_host_network_gateways(default, external):
    # hostNetwork gateways send from their nodes: without the nodes' CIDRs no policy can let
    # them through, so none is rendered (and NOTES.txt says so) rather than cut calls off
    assert not find(default, "NetworkPolicy")
    workers = one(external, "NetworkPolicy", f"{FULLNAME}-worker")["spec"]
    assert workers["ingress"][0]["from"][1:] == [
        {"ipBlock": {"cidr": "10.0.0.0/24"}},
        {"ipBlock": {"cidr": "10.0.1.0/24"}},
    ]
    assert workers["ingress"][1]["from"][0]["namespaceSelector"] == {}  # Prometheus in any namespace
    assert workers["ingress"][2]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "telephony-ops"}}}]
    assert not find(external, "NetworkPolicy", f"{FULLNAME}-redis")  # no bundled Redis
    off = render(None, "networkPolicy.enabled=false", "networkPolicy.gatewayNodeCIDRs={10.0.0.0/24}")
    assert not find(off, "NetworkPolicy")


# ----------------------------------------------------------------------------- redis


def test_bundled_redis_with_aof(default):
    sts = one(default, "StatefulSet", f"{FULLNAME}-redis")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    args = c["command"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    assert "--requirepass" in args
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/data"}
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    one(default, "Service", f"{FULLNAME}-redis")
    secret = one(default, "Secret", f"{FULLNAME}-redis")
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    for c in (gateway(default), worker(default)):
        url = secret_value(default, env_of(c)["REDIS_URL"])
        assert url == f"redis://:{password}@{FULLNAME}-redis:6379/0"


def test_bundled_redis_without_password(loadbalancer):
    args = container(loadbalancer, "StatefulSet", f"{FULLNAME}-redis")["command"]
    assert "--requirepass" not in args
    assert secret_value(loadbalancer, env_of(gateway(loadbalancer))["REDIS_URL"]) == f"redis://{FULLNAME}-redis:6379/0"


def test_external_redis(external):
    assert not find(external, "StatefulSet", f"{FULLNAME}-redis")
    assert not find(external, "Service", f"{FULLNAME}-redis")
    url = "redis+sentinel://sentinel-0.redis:26379,sentinel-1.redis:26379/mymaster/0"
    for c in (gateway(external), worker(external)):
        assert secret_value(external, env_of(c)["REDIS_URL"]) == url


def test_call_retention_and_webhook_reach_the_gateway(external, default):
    env = env_of(gateway(external))
    assert env["MOSHIMOSHI_CALL_RETENTION_SECONDS"]["value"] == "86400"
    assert env["MOSHIMOSHI_WEBHOOK_URL"].get("value") == "https://crm.example.com/hooks/calls"
    assert env["MOSHIMOSHI_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "crm-webhook",
        "key": "webhook-secret",
    }
    assert "MOSHIMOSHI_WEBHOOK_URL" not in env_of(gateway(default))


def test_recordings_on_a_shared_volume_or_in_a_bucket_and_the_consent_announcement(default):
    env = env_of(gateway(default))
    assert (
        env["MOSHIMOSHI_RECORDING"]["value"],
        env["MOSHIMOSHI_TRANSCRIPTION"]["value"],
        env["MOSHIMOSHI_DTMF_CLEAR"]["value"],
    ) == ("off", "true", "false")
    assert not find(default, "PersistentVolumeClaim", f"{FULLNAME}-recordings")  # nothing recorded: no volume
    docs = render(None, "gateway.record.recording=ogg", "gateway.record.consentAnnouncement.existingConfigMap=consent")
    claim = one(docs, "PersistentVolumeClaim", f"{FULLNAME}-recordings")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # any replica serves any recording
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = one(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    assert env["MOSHIMOSHI_RECORDING"]["value"] == "ogg"
    assert env["MOSHIMOSHI_RECORDING_DIR"]["value"] == "/var/lib/moshimoshi/recordings"
    assert env["MOSHIMOSHI_CONSENT_ANNOUNCEMENT"]["value"] == "/etc/moshimoshi/announcements/consent.wav"
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["recordings"] == "/var/lib/moshimoshi/recordings"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["recordings"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-recordings"
    assert volumes["announcements"]["configMap"]["name"] == "consent"
    docs = render(
        None,
        "gateway.record.recording=wav",
        "gateway.record.s3.bucket=calls",
        "gateway.record.s3.existingSecret=s3-keys",
        "gateway.record.persistence.enabled=false",
    )
    assert not find(docs, "PersistentVolumeClaim", f"{FULLNAME}-recordings")
    env = env_of(gateway(docs))
    assert env["MOSHIMOSHI_RECORDING_S3_BUCKET"]["value"] == "calls"
    assert env["MOSHIMOSHI_RECORDING_DIR"]["value"] == "/tmp/recordings"  # only the files being written
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-keys",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    with pytest.raises(HelmError, match="must be off, wav or ogg"):
        render(None, "gateway.record.recording=mp3")


def test_external_redis_from_an_existing_secret():
    docs = render(None, "redis.enabled=false", "redis.existingSecret=redis-creds", "redis.existingSecretKey=url")
    assert not find(docs, "StatefulSet", f"{FULLNAME}-redis")
    assert env_of(gateway(docs))["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-creds", "key": "url"}


# ----------------------------------------------------------------------------- every pod


def test_every_container_has_resources_security_and_probes(rendered):
    for values, docs in rendered.items():
        for workload, pod in pod_templates(docs):
            where = f"{values}: {workload}"
            security = pod.get("securityContext", {})
            assert security.get("runAsNonRoot") is True, where
            assert security.get("runAsUser", 0) != 0, where
            for c in pod["containers"] + pod.get("initContainers", []):
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{where} {bound}"
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                assert not sc["capabilities"].get("add"), where
                assert "livenessProbe" in c and "readinessProbe" in c, where
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"


def test_pod_disruption_budgets(rendered):
    for docs in rendered.values():
        for component, kind in (("gateway", "Deployment"), ("worker", "StatefulSet")):
            pdb = one(docs, "PodDisruptionBudget", f"{FULLNAME}-{component}")
            pod_labels = one(docs, kind, f"{FULLNAME}-{component}")["spec"]["template"]["metadata"]["labels"]
            assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
            assert pdb["spec"]["maxUnavailable"] == 1


def test_prestop_hooks_and_grace_periods(rendered):
    for docs in rendered.values():
        for kind, component in (("Deployment", "gateway"), ("StatefulSet", "worker")):
            pod = one(docs, kind, f"{FULLNAME}-{component}")["spec"]["template"]["spec"]
            c = pod["containers"][0]
            drain = float(env_of(c)["MOSHIMOSHI_DRAIN_GRACE_SECONDS"]["value"])
            assert pod["terminationGracePeriodSeconds"] > drain
            assert c["lifecycle"]["preStop"]["exec"]["command"]
        gateway_hook = gateway(docs)["lifecycle"]["preStop"]["exec"]["command"]
        assert gateway_hook[0] == "sleep"
        worker_hook = worker(docs)["lifecycle"]["preStop"]["exec"]["command"]
        assert worker_hook[:2] == ["python", "-c"] and "/v1/drain" in worker_hook[2]


class _FakeWorker(BaseHTTPRequestHandler):
    """Stands in for the worker's HTTP API: POST /v1/drain, GET /metrics."""

    busy_after_drain: list[int] = []
    drained = threading.Event()
    scrapes = 0
    secret = "drain-hook-secret-0123456789"

    def do_POST(self):  # noqa: N802
        if self.path == "/v1/drain" and self.headers.get("Authorization") == f"Bearer {self.secret}":
            type(self).drained.set()
            self.send_response(202)
        elif self.path == "/v1/drain":
            self.send_response(401)  # as the worker answers without its secret
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        cls = type(self)
        busy = 3
        if self.path == "/metrics" and cls.drained.is_set():
            cls.scrapes += 1
            busy = cls.busy_after_drain[min(cls.scrapes, len(cls.busy_after_drain)) - 1]
        body = (
            f"# TYPE moshimoshi_worker_slots_busy gauge\nmoshimoshi_worker_slots_busy {busy}.0\n"
            "moshimoshi_worker_slots 4.0\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _run_drain_hook(default, busy: list[int], grace: float) -> tuple[float, type[_FakeWorker]]:
    handler = type("Fake", (_FakeWorker,), {"busy_after_drain": busy, "drained": threading.Event(), "scrapes": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        command = worker(default)["lifecycle"]["preStop"]["exec"]["command"]
        env = dict(
            os.environ,
            MOSHIMOSHI_PORT=str(server.server_address[1]),
            MOSHIMOSHI_DRAIN_GRACE_SECONDS=str(grace),
            MOSHIMOSHI_WORKER_SECRET=_FakeWorker.secret,
        )
        start = time.monotonic()
        proc = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return time.monotonic() - start, handler
    finally:
        server.shutdown()
        server.server_close()


def test_worker_prestop_drains_then_waits_for_the_last_call(default):
    _, handler = _run_drain_hook(default, busy=[2, 1, 0, 0], grace=60)
    assert handler.drained.is_set()
    assert handler.scrapes == 3, "stops polling as soon as no slot is busy"


def test_worker_prestop_gives_up_at_the_drain_grace(default):
    elapsed, handler = _run_drain_hook(default, busy=[1], grace=3)
    assert handler.drained.is_set()
    assert 3 <= elapsed < 20
    assert handler.scrapes >= 2


def test_worker_prestop_returns_when_the_worker_is_gone(default):
    command = worker(default)["lifecycle"]["preStop"]["exec"]["command"]
    from tests.support.procs import free_port

    env = dict(os.environ, MOSHIMOSHI_PORT=str(free_port()), MOSHIMOSHI_DRAIN_GRACE_SECONDS="300")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert time.monotonic() - start < 30
    assert "drain request failed" in proc.stdout


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "sets, message",
    [
        (
            [
                "gateway.networking.mode=loadBalancer",
                "gateway.networking.publicHost=192.0.2.1",
                "gateway.rtp.portMax=20099",
            ],
            "gateway.replicas to 1",
        ),
        (
            ["gateway.networking.mode=loadBalancer", "gateway.replicas=1", "gateway.rtp.portMax=20099"],
            "needs gateway.networking.publicHost",
        ),
        (
            ["gateway.networking.mode=loadBalancer", "gateway.replicas=1", "gateway.networking.publicHost=192.0.2.1"],
            "more than gateway.networking.loadBalancer.maxRtpPorts",
        ),
        (["gateway.networking.mode=nodePort"], "must be hostNetwork or loadBalancer"),
        (["gateway.rtp.portMin=20001"], "must be even"),
        (["gateway.rtp.portMin=30000", "gateway.rtp.portMax=20000"], "must be below gateway.rtp.portMax"),
        (["redis.enabled=false"], "set redis.externalUrl or redis.existingSecret"),
        (["redis.enabled=false", "redis.externalUrl=http://redis:6379"], "must start with redis://"),
        (["workerSecret.value=too-short"], "workerSecret.value must have at least 16 characters"),
    ],
)
def test_bad_values_fail_with_a_clear_message(sets, message):
    with pytest.raises(HelmError, match=re.escape(message)):
        render(None, *sets)


def render_notes(tmp_path: Path, values: Path) -> str:
    """NOTES.txt as `helm install` prints it: rendered as the body of a throwaway ConfigMap
    in a copy of the chart (helm template skips NOTES.txt)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    body = re.sub(r"\{\{-|-\}\}", lambda m: m.group(0).replace("-", ""), notes)
    wrapper = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
    wrapper += "".join("    " + line + "\n" for line in body.splitlines())
    (chart / "templates" / "zz-notes.yaml").write_text(wrapper)
    out = run_helm(
        "template", "t", str(chart), "-n", "tel", "-f", str(values), "--show-only", "templates/zz-notes.yaml"
    )
    return yaml.safe_load(out)["data"]["notes"]


def test_notes(tmp_path):
    by_name = {p.stem: p for p in CI_VALUES}
    notes = render_notes(tmp_path, by_name["default-values"])
    assert "sip:<node IP>:5060" in notes and "UDP 20000-20999" in notes
    assert "get secret t-moshimoshi-api-tokens" in notes
    assert "WARNING: no NetworkPolicy" in notes and "networkPolicy.gatewayNodeCIDRs" in notes
    notes = render_notes(tmp_path / "lb", by_name["loadbalancer-no-operator-values"])
    assert "sip:203.0.113.10:5060" in notes and "No ServiceMonitor" in notes
    assert "NetworkPolicies t-moshimoshi-worker and t-moshimoshi-redis" in notes
    notes = render_notes(tmp_path / "ext", by_name["external-redis-values"])
    assert "CC BY-NC 4.0" in notes


# ----------------------------------------------------------------------------- values.yaml


def undocumented_keys(text: str) -> list[str]:
    """Keys of a values file with neither a comment line right above (same indent) nor an
    inline comment."""
    missing = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(- )?([A-Za-z0-9_.\-/\"']+):(\s|$)", line)
        if not m or line.lstrip().startswith("#"):
            continue
        if re.search(r"\s#\s", line[m.end() - 1 :]):
            continue
        indent = len(m.group(1)) + (2 if m.group(2) else 0)
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        above = lines[j] if j >= 0 else ""
        if above.lstrip().startswith("#") and len(above) - len(above.lstrip()) == indent:
            continue
        missing.append(f"line {i + 1}: {line.strip()}")
    return missing


def test_every_value_is_documented():
    assert undocumented_keys((CHART / "values.yaml").read_text()) == []


def test_undocumented_value_check_finds_gaps():
    sample = "# doc\na: 1\nb: 2\nc:\n  # doc\n  d: 1\n  e: 2  # doc\n  f: 3\n# doc\ng:\n  - h: 1\n"
    assert [m.split(":")[0] for m in undocumented_keys(sample)] == ["line 3", "line 4", "line 8", "line 11"]


# ----------------------------------------------------------------------------- chart ↔ ops copies


@pytest.mark.parametrize(
    "canonical, copy",
    [
        (ALERTS, CHART / "files" / "prometheus" / "alerts.yaml"),
        (DASHBOARD, CHART / "files" / "grafana" / "moshimoshi.json"),
    ],
)
def test_chart_files_are_the_ops_files(canonical, copy):
    assert copy.read_bytes() == canonical.read_bytes(), (
        f"{copy.relative_to(REPO_ROOT)} differs from {canonical.relative_to(REPO_ROOT)}: run ops/tools/sync-chart-files.sh"
    )


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint():
    proc = subprocess.run(
        [HADOLINT, "--config", str(REPO_ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\n")
    proc = subprocess.run(
        [HADOLINT, "--config", str(REPO_ROOT / ".hadolint.yaml"), str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # the :latest tag


def test_dockerfile_targets():
    stages = {s.name: s for s in dockerfile.stages(DOCKERFILE)}
    assert {"gateway", "worker"} <= set(stages)
    for name, port, command in (("gateway", "8080", "gateway"), ("worker", "8081", "worker")):
        stage = stages[name]
        user = stage.all("USER")[-1].split(":")[0]
        assert user not in ("root", "0"), f"{name} runs as {user}"
        (healthcheck,) = stage.all("HEALTHCHECK")
        assert "/healthz" in healthcheck and port in healthcheck
        assert json.loads(stage.all("ENTRYPOINT")[-1]) == ["moshimoshi", command]
    exposed = " ".join(stages["gateway"].all("EXPOSE")).split()
    assert {"5060/udp", "5060/tcp", "8080/tcp"} <= set(exposed)
    assert any("VOLUME" == kw and "/cache" in args for kw, args in stages["worker"].instructions)


def test_gateway_image_installs_no_torch():
    all_stages = dockerfile.stages(DOCKERFILE)
    lineage = dockerfile.lineage(all_stages, "gateway")
    assert {s.name for s in lineage} >= {"gateway", "gateway-build"}
    for stage in lineage:
        for keyword, args in stage.instructions:
            assert "torch" not in args.lower(), f"{stage.name}: {keyword} {args}"
            if keyword == "RUN" and "pip install" in args:
                assert "[worker]" not in args
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in extras["gateway"] if d.lower().startswith(("torch", "moshi"))]


def test_worker_image_installs_pinned_torch_then_moshi_without_deps():
    stages = {s.name: s for s in dockerfile.stages(DOCKERFILE)}
    runs = [args for s in dockerfile.lineage(list(stages.values()), "worker") for args in s.all("RUN")]
    build = stages["worker-build"].all("RUN")
    torch = next(i for i, r in enumerate(build) if "torch==" in r)
    moshi = next(i for i, r in enumerate(build) if "moshi==" in r)
    project = next(i for i, r in enumerate(build) if ".[worker]" in r)
    assert torch < moshi < project
    assert "--no-deps" in build[moshi]
    assert runs
    args = {
        a.split("=")[0]: a.split("=", 1)[1]
        for kw, a in dockerfile.instructions(DOCKERFILE.read_text())
        if kw == "ARG" and "=" in a
    }
    assert args["TORCH_VERSION"] == "2.13.0" and args["MOSHI_VERSION"] == "0.2.13"


def test_dockerfile_copies_only_what_exists():
    for stage in dockerfile.stages(DOCKERFILE):
        for args in stage.all("COPY"):
            if "--from=" in args:
                continue
            for source in args.split()[:-1]:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"


# ----------------------------------------------------------------------------- metrics used


def project_metrics() -> dict[str, MetricDef]:
    defs = defined_metrics(REPO_ROOT / "service")
    if not (REPO_ROOT / "service" / "worker" / "metrics.py").exists():
        for d in CONTRACT_WORKER_METRICS:
            defs.setdefault(d.name, d)
    return defs


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) of every query."""
    board = json.loads(DASHBOARD.read_text())
    out = [("variable " + v["name"], v["query"]["query"]) for v in board["templating"]["list"] if v["type"] == "query"]
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    return [(title, expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")) for title, expr in out]


def test_metric_catalog_reads_the_runtime_registry():
    """The source reader finds what prometheus_client really registers, with the same type."""
    from prometheus_client import REGISTRY, CollectorRegistry

    defs = project_metrics()
    importlib.import_module("service.gateway.metrics")
    families = [f for f in REGISTRY.collect() if f.name.startswith("moshimoshi_")]
    try:
        worker_metrics = importlib.import_module("service.worker.metrics")
    except ModuleNotFoundError:
        worker_metrics = None
    if worker_metrics is not None:
        for value in vars(worker_metrics).values():
            if isinstance(value, type) and value.__module__ == worker_metrics.__name__:
                try:
                    instance = value()
                except TypeError:
                    continue
                registry = getattr(instance, "registry", None)
                if isinstance(registry, CollectorRegistry):
                    families += list(registry.collect())
    assert len(families) >= 15
    for family in families:
        d = defs.get(family.name) or defs.get(family.name + "_total")
        assert d is not None, f"{family.name} is registered but the catalog does not see it"
        # "untyped": built at scrape time from a constant name (the per-call RTP counters)
        assert d.kind in (family.type, "untyped"), f"{family.name}: {d.kind} in source, {family.type} registered"


def test_alerts_and_dashboard_use_only_defined_metrics():
    index = exposition_index(project_metrics())
    queries = [(rule["alert"], rule["expr"]) for rule in alert_rules()] + dashboard_queries()
    unknown = {f"{where}: {name}" for where, expr in queries for name in used_metrics(expr) if name not in index}
    assert not unknown, f"queried but not defined in service/: {sorted(unknown)}"
    bad_labels = [f"{where}: {p}" for where, expr in queries for p in label_problems(expr, index)]
    assert not bad_labels


def test_metric_check_catches_a_typo():
    index = exposition_index(project_metrics())
    assert "moshimoshi_calls_active_total" not in index  # a gauge has no _total
    assert "moshimoshi_worker_step_duration_seconds_bucket" in index
    assert label_problems('sum by (status) (rate(moshimoshi_http_requests_total{status="500"}[5m]))', index) == [
        "moshimoshi_http_requests_total{status}",
        "by (status)",
    ]


def test_dashboard_covers_calls_capacity_latency_quality_and_workers():
    board = json.loads(DASHBOARD.read_text())
    used = set().union(*(used_metrics(expr) for _, expr in dashboard_queries()))
    for metric in (
        "calls_active",
        "calls_total",
        "call_duration_seconds_bucket",
        "pool_slots",
        "pool_slots_busy",
        "pool_workers",
        "gateway_added_latency_seconds_bucket",
        "pool_claim_duration_seconds_bucket",
        "pool_queue_wait_seconds_bucket",
        "rtp_jitter_seconds_bucket",
        "rtp_packets_lost_total",
        "rtp_concealed_frames_total",
        "rtp_packets_late_total",
        "rtp_packets_stray_total",
        "rtp_pacer_lateness_seconds_bucket",
        "worker_step_duration_seconds_bucket",
        "worker_slot_underruns_total",
    ):
        assert "moshimoshi_" + metric in used, metric
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])
    step = [p for p in board["panels"] if p["title"] == "Step duration"][0]
    legends = {t["legendFormat"] for t in step["targets"]}
    assert legends == {"p50 {{pod}}", "p99 {{pod}}"}
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "namespace"}


def test_dashboard_json_is_what_the_generator_writes():
    proc = subprocess.run(
        [sys.executable, str(OPS / "grafana" / "dashboard.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_alert_rules_are_complete():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {
        "MoshimoshiNoReadyWorker",
        "MoshimoshiPoolCapacityHigh",
        "MoshimoshiWorkerStepSlow",
        "MoshimoshiPacketLossHigh",
        "MoshimoshiApiErrorRateHigh",
        "MoshimoshiGatewayNotReady",
    } <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    tested = {
        t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for t in case["alert_rule_test"]
    }
    assert tested == names, f"alerts without a promtool unit test: {sorted(names - tested)}"


# ----------------------------------------------------------------------------- promtool

needs_promtool = requires(PROMTOOL is not None, "promtool is not installed (Debian package prometheus)")


@needs_promtool
def test_promtool_checks_the_rules():
    proc = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_alerts():
    proc = subprocess.run(
        [PROMTOOL, "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(dashboard_queries())
                    if not expr.startswith("label_values(")
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- env ↔ settings


def resolved_env(docs: list[dict], c: dict) -> dict[str, str]:
    """The container's environment as the kubelet would build it (downward API faked)."""
    fields = {"status.podIP": "10.0.0.7", "status.hostIP": "192.0.2.20", "metadata.name": "pod-0"}
    env: dict[str, str] = {}
    for item in c["env"]:
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif "fieldRef" in item["valueFrom"]:
            value = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            key_ref = item["valueFrom"]["secretKeyRef"]
            value = secret_value(docs, item) if find(docs, "Secret", key_ref["name"]) else "from-existing-secret"
        env[item["name"]] = value
    return env


@pytest.mark.parametrize("role", ["gateway", "worker"])
def test_chart_env_is_valid_settings(rendered, role):
    """Every MOSHIMOSHI_* variable the chart sets is a real setting, and the values load."""
    import dataclasses

    from service.config import env_name, load
    from service.settings import GatewaySettings, WorkerSettings

    cls = GatewaySettings if role == "gateway" else WorkerSettings
    known = {env_name(f) for f in dataclasses.fields(cls)}
    for values, docs in rendered.items():
        c = gateway(docs) if role == "gateway" else worker(docs)
        env = resolved_env(docs, c)
        unknown = {name for name in env if name.startswith("MOSHIMOSHI_") and name not in known}
        assert not unknown, f"{values}: {role} gets variables it does not read: {sorted(unknown)}"
        settings = load(cls, environ=env)
        assert settings.redis_url and "$(" not in settings.redis_url
        if role == "worker":
            assert settings.advertise_url == "ws://10.0.0.7:8081"
            assert settings.port == 8081 and settings.worker_id == "pod-0"
        else:
            assert (settings.sip_port, settings.http_port) == (5060, 8080)
            assert settings.public_host in ("192.0.2.20", "203.0.113.10")
