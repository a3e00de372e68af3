"""Generates ops/grafana/moshimoshi.json, the moshimoshi Grafana dashboard.

Edit the panels here, then run ``python ops/grafana/dashboard.py`` (writes the JSON) and
``ops/tools/sync-chart-files.sh`` (copies it into the Helm chart). ``--check`` exits 1 when
the committed JSON differs from what this script generates (tests/test_deploy.py runs it).

Pool gauges (``moshimoshi_pool_*``) come from every gateway reading the same Redis, so they
are combined with ``max`` per namespace and model, never summed across gateways.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).with_name("moshimoshi.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"


def target(expr: str, legend: str, ref: str) -> dict:
    return {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "range": True,
        "editorMode": "code",
    }


def quantiles(
    metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99), window: str = RATE
) -> list[tuple[str, str]]:
    """histogram_quantile targets for ``metric``'s buckets, one per quantile."""
    group = f"{by}, le" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{NS}}}[{window}])))",
            f"p{round(q * 100):g}{suffix}",
        )
        for q in qs
    ]


class Layout:
    """Places panels left to right in rows of 24 grid units."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.row_height = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": self._id(),
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_height
            self.x = 0
            self.row_height = 0

    def _place(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel["id"] = self._id()
        self.x += w
        self.row_height = max(self.row_height, h)
        self.panels.append(panel)

    def stat(
        self,
        title: str,
        expr: str,
        description: str,
        unit: str = "short",
        thresholds: list[tuple[float | None, str]] | None = None,
        w: int = 6,
    ) -> None:
        steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
        self._place(
            {
                "type": "stat",
                "title": title,
                "description": description,
                "datasource": DATASOURCE,
                "targets": [target(expr, "", "A")],
                "fieldConfig": {
                    "defaults": {
                        "unit": unit,
                        "thresholds": {"mode": "absolute", "steps": steps},
                        "color": {"mode": "thresholds"},
                    },
                    "overrides": [],
                },
                "options": {
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value",
                    "graphMode": "area",
                    "textMode": "auto",
                    "justifyMode": "auto",
                    "orientation": "auto",
                },
            },
            w,
            4,
        )

    def graph(
        self,
        title: str,
        queries: list[tuple[str, str]],
        description: str,
        unit: str = "short",
        threshold: float | None = None,
        w: int = 8,
        stack: bool = False,
        min_zero: bool = True,
    ) -> None:
        steps = [{"color": "green", "value": None}]
        if threshold is not None:
            steps.append({"color": "red", "value": threshold})
        defaults: dict = {
            "unit": unit,
            "custom": {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 10 if stack else 0,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                "thresholdsStyle": {"mode": "line" if threshold is not None else "off"},
            },
            "thresholds": {"mode": "absolute", "steps": steps},
            "color": {"mode": "palette-classic"},
        }
        if min_zero:
            defaults["min"] = 0
        refs = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        self._place(
            {
                "type": "timeseries",
                "title": title,
                "description": description,
                "datasource": DATASOURCE,
                "targets": [target(expr, legend, refs[i]) for i, (expr, legend) in enumerate(queries)],
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"},
                },
            },
            w,
            8,
        )


def rate(metric: str, by: str = "", extra: str = "") -> str:
    selector = f"{{{NS}{', ' + extra if extra else ''}}}"
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{selector}[{RATE}]))"


def pool(metric: str, by: str = "model") -> str:
    return f"max by (namespace, {by}) ({metric}{{{NS}}})"


def build() -> dict:
    g = Layout()

    g.row("Overview")
    g.stat(
        "Active calls", f"sum(moshimoshi_calls_active{{{NS}}})", "Calls in progress on all gateways (SIP and WebRTC)."
    )
    g.stat(
        "Pool utilisation",
        f"sum({pool('moshimoshi_pool_slots_busy')}) / sum({pool('moshimoshi_pool_slots')})",
        "Busy slots over the slots of ready workers. Calls queue, then get 503, when this reaches 100 %.",
        unit="percentunit",
        thresholds=[(None, "green"), (0.75, "orange"), (0.9, "red")],
    )
    g.stat(
        "Ready workers",
        f"sum(moshimoshi_worker_ready{{{NS}}})",
        "Workers whose model is loaded and warm and that are not draining.",
        thresholds=[(None, "red"), (1, "green")],
    )
    g.stat(
        "Ready gateways",
        f"sum(moshimoshi_gateway_ready{{{NS}}})",
        "Gateways that take calls (Redis up, a worker ready, not draining).",
        thresholds=[(None, "red"), (1, "green")],
    )

    g.row("Calls")
    g.graph(
        "Active calls",
        [(f"sum by (ingress) (moshimoshi_calls_active{{{NS}}})", "{{ingress}}")],
        "Calls in progress, by ingress (sip, webrtc).",
        stack=True,
    )
    g.graph(
        "Calls by outcome",
        [(rate("moshimoshi_calls_total", "outcome") + " * 60", "{{outcome}}")],
        "Calls ended per minute, by outcome.",
        unit="short",
        stack=True,
    )
    g.graph(
        "Call duration",
        quantiles("moshimoshi_call_duration_seconds", window="30m"),
        "Length of answered calls (quantiles over the last 30 minutes).",
        unit="s",
    )
    g.graph(
        "SIP responses",
        [(rate("moshimoshi_sip_responses_total", "code"), "{{code}}")],
        "SIP responses sent per second, by status code (503: no slot or draining).",
        unit="reqps",
    )
    g.graph(
        "API requests",
        [(rate("moshimoshi_http_requests_total", "code"), "{{code}}")],
        "HTTP requests per second to the gateways' API, by status code.",
        unit="reqps",
    )
    g.graph(
        "Redis errors",
        [(rate("moshimoshi_redis_errors_total", "operation"), "{{operation}}")],
        "Failed Redis operations per second, by operation.",
        unit="ops",
    )

    g.row("Capacity")
    g.graph(
        "Pool slots",
        [(pool("moshimoshi_pool_slots"), "capacity {{model}}"), (pool("moshimoshi_pool_slots_busy"), "busy {{model}}")],
        "Slots of ready workers (capacity) and slots holding a lease, by model.",
    )
    g.graph(
        "Workers",
        [(pool("moshimoshi_pool_workers", "state"), "{{state}}")],
        "Live workers in the pool, by state.",
        stack=True,
    )
    g.graph(
        "Worker slots busy",
        [
            (f"sum by (pod) (moshimoshi_worker_slots_busy{{{NS}}})", "{{pod}}"),
            (f"sum(moshimoshi_worker_slots{{{NS}}})", "capacity"),
        ],
        "Busy slots on each worker (batch occupancy), against the total slots.",
    )
    g.graph(
        "Queued and rejected calls",
        [
            (rate("moshimoshi_pool_queued_calls_total") + " * 60", "queued"),
            (rate("moshimoshi_pool_rejected_calls_total", "reason") + " * 60", "rejected {{reason}}"),
        ],
        "Calls per minute that waited for a slot, and calls refused with 503.",
        w=12,
    )
    g.graph(
        "Queue wait",
        quantiles("moshimoshi_pool_queue_wait_seconds", qs=(0.5, 0.99)),
        "How long calls waited (ringing) for a free slot.",
        unit="s",
        w=12,
    )

    g.row("Latency")
    g.graph(
        "Gateway-added latency",
        quantiles("moshimoshi_gateway_added_latency_seconds"),
        "What the gateway adds to the conversation: jitter buffer, resampling both ways, framing "
        "and egress pacing. Budget: 30 ms at the median.",
        unit="s",
        threshold=0.03,
    )
    g.graph(
        "Gateway-added latency by pod (p50)",
        quantiles("moshimoshi_gateway_added_latency_seconds", by="pod", qs=(0.5,)),
        "Median added latency on each gateway.",
        unit="s",
        threshold=0.03,
    )
    g.graph(
        "Slot claim",
        quantiles("moshimoshi_pool_claim_duration_seconds", qs=(0.5, 0.99)),
        "Time to claim a worker slot in Redis.",
        unit="s",
    )

    g.row("Audio quality")
    g.graph(
        "RTP jitter",
        quantiles("moshimoshi_rtp_jitter_seconds"),
        "Interarrival jitter of callers' RTP (sampled every few seconds per call).",
        unit="s",
    )
    loss = rate("moshimoshi_rtp_packets_lost_total", "pod")
    received = rate("moshimoshi_rtp_packets_received_total", "pod")
    g.graph(
        "Packet loss",
        [(f"{loss} / ({received} + {loss})", "{{pod}}")] + quantiles("moshimoshi_rtp_loss_ratio", qs=(0.9,)),
        "Callers' RTP lost in the network, by gateway; p90 is over calls (per-call samples).",
        unit="percentunit",
        threshold=0.02,
    )
    g.graph(
        "Packet problems",
        [
            (rate("moshimoshi_rtp_concealed_frames_total"), "concealed frames"),
            (rate("moshimoshi_rtp_packets_late_total"), "late"),
            (rate("moshimoshi_rtp_packets_stray_total"), "stray"),
            (rate("moshimoshi_rtp_packets_duplicate_total"), "duplicate"),
            (rate("moshimoshi_rtp_packets_malformed_total"), "malformed"),
            (rate("moshimoshi_srtp_packets_replayed_total"), "SRTP replayed"),
            (rate("moshimoshi_srtp_packets_auth_failed_total"), "SRTP forged"),
        ],
        "Per second: frames concealed (PLC), packets past their playout deadline, from an "
        "unexpected source, duplicated or malformed; SRTP packets dropped as replays or because "
        "their authentication failed (forged, corrupted).",
        unit="pps",
    )
    g.graph(
        "RTP packets",
        [
            (rate("moshimoshi_rtp_packets_received_total"), "received"),
            (rate("moshimoshi_rtp_packets_sent_total"), "sent"),
        ],
        "RTP packets per second to and from callers (50 per second per call each way).",
        unit="pps",
        w=12,
    )
    g.graph(
        "Egress pacer lateness",
        quantiles("moshimoshi_rtp_pacer_lateness_seconds", qs=(0.5, 0.99)),
        "How late each packet to the caller left against its 20 ms schedule.",
        unit="s",
        w=12,
    )
    g.graph(
        "SIP over TLS handshakes",
        [
            (rate("moshimoshi_sip_tls_handshakes_total", "outcome"), "{{outcome}}"),
            (rate("moshimoshi_sip_tls_certificate_reloads_total", "outcome"), "certificate reload {{outcome}}"),
        ],
        "TLS handshakes per second by outcome: ok, failed (old TLS versions, unknown certificates, "
        "plain SIP on the TLS port) and timeout; certificate reloads after renewals.",
        unit="ops",
        w=12,
    )

    g.row("Workers")
    g.graph(
        "Step duration",
        quantiles("moshimoshi_worker_step_duration_seconds", by="pod", qs=(0.5, 0.99)),
        "One batched model step (Mimi encode, LM step, Mimi decode for all slots). Above 80 ms "
        "the worker falls behind real time.",
        unit="s",
        threshold=0.08,
        w=12,
    )
    g.graph(
        "Underruns and drops",
        [
            (rate("moshimoshi_worker_slot_underruns_total", "pod"), "underruns {{pod}}"),
            (rate("moshimoshi_worker_input_dropped_total", "pod"), "input dropped {{pod}}"),
            (rate("moshimoshi_worker_step_overruns_total", "pod"), "step overruns {{pod}}"),
        ],
        "Per second: busy slots fed silence for want of input, input frames dropped from full "
        "queues, steps that ended after the next 80 ms tick.",
        unit="ops",
        w=12,
    )
    g.graph(
        "Worker sessions",
        [(rate("moshimoshi_worker_sessions_total", "outcome") + " * 60", "{{outcome}}")],
        "Sessions ended per minute on the workers, by outcome.",
        w=12,
        stack=True,
    )
    g.graph(
        "Worker readiness",
        [(f"sum by (pod) (moshimoshi_worker_ready{{{NS}}})", "{{pod}}")],
        "1 when a worker's model is loaded and warm and it is not draining.",
        w=12,
    )

    return {
        "title": "moshimoshi",
        "uid": "moshimoshi",
        "description": "Calls, capacity, latency, audio quality and inference of moshimoshi.",
        "tags": ["moshimoshi", "telephony"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "includeAll": False,
                    "multi": False,
                    "options": [],
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(moshimoshi_gateway_ready, namespace)", "refId": "namespace"},
                    "definition": "label_values(moshimoshi_gateway_ready, namespace)",
                    "current": {},
                    "hide": 0,
                    "refresh": 2,
                    "regex": "",
                    "sort": 1,
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "options": [],
                },
            ]
        },
        "panels": g.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
