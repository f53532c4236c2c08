"""Prometheus metrics of a running episodic pipeline (``memstream run --metrics-port PORT``).

The pipeline's steps count in Beam metrics (namespace ``memstream``: records handled, windows cut,
summaries stored, dead letters by reason, operator and sink latency); the runner aggregates
them, and this server asks its job service for them at each scrape. Consumer lag per
partition is the latents topic's end offset minus the offset the pipeline's group committed.
Served on 127.0.0.1 in the Prometheus text format at ``/metrics``.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from memstream.settings import HOST, KafkaSecurity
from memstream.topics import kafka_python

log = logging.getLogger(__name__)


def _query(result) -> dict:
    """Beam metrics of ``result`` now: counters and distributions by name (committed values
    where the runner keeps them)."""
    from apache_beam.portability.api import beam_job_api_pb2
    from apache_beam.runners.portability.portable_runner import PortableMetrics

    service = getattr(result, "_job_service", None)
    if service is not None:  # the job service answers while the job runs; result.metrics() caches
        metrics = PortableMetrics(service.GetJobMetrics(beam_job_api_pb2.GetJobMetricsRequest(job_id=result._job_id)))
    else:
        metrics = result.metrics()
    got = metrics.query()
    out = {}
    for kind in ("counters", "distributions"):
        for m in got.get(kind, []):
            if m.key.metric.namespace == "memstream":
                # Prism keeps the job's totals in committed and only the last bundle's in attempted
                value = m.committed if m.committed is not None else m.attempted
                name = m.key.metric.name
                if kind == "counters":
                    out[name] = out.get(name, 0) + int(value)
                else:
                    prev = out.get(name)
                    out[name] = value if prev is None else prev  # one step reports each distribution
    return out


def lag(bootstrap: str, topic: str, group: str, security: KafkaSecurity | None = None) -> dict[int, int]:
    """Partition -> records between the group's committed offset and the end of the topic."""
    from kafka import TopicPartition

    c = kafka_python("consumer", bootstrap, security, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
        ends = c.end_offsets(tps)
        begins = c.beginning_offsets(tps)
        return {tp.partition: ends[tp] - max(c.committed(tp) or begins[tp], begins[tp]) for tp in tps}
    finally:
        c.close()


class MetricsServer:
    """``MetricsServer(config, port)``, then ``watch(result)`` once the job runs."""

    def __init__(self, config, port: int):
        self.config, self.result = config, None
        self._last: tuple[float, int] | None = None
        self._rate = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "metrics are at /metrics")
                    return
                body = server.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._http = ThreadingHTTPServer((HOST, port), Handler)
        self.port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics", HOST, self.port)

    def watch(self, result) -> None:
        self.result = result

    def render(self) -> str:
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP memstream_{name} {help_}")
            lines.append(f"# TYPE memstream_{name} {kind}")
            lines.extend(f"memstream_{name}{labels} {value}" for labels, value in samples if value is not None)

        try:
            lags = lag(self.config.bootstrap, self.config.latents_topic, self.config.group, self.config.security)
            metric("consumer_lag", "gauge", "records of the latents topic past the committed offset",
                   [(f'{{partition="{p}"}}', n) for p, n in lags.items()])
        except Exception as e:  # the broker may be away for a moment: the other metrics still come
            log.debug("lag unavailable: %s", e)
        values = {}
        if self.result is not None:
            try:
                values = _query(self.result)
            except Exception as e:
                log.debug("Beam metrics unavailable: %s", e)
        for name, help_ in (("records", "records of the latents topic handled (summarised, dropped or dead-lettered)"),
                            ("windows_cut", "windows cut from sessions"),
                            ("summaries_stored", "summaries chained, signed and stored"),
                            ("sessions_resumed", "sessions whose state was rebuilt from their stored head"),
                            ("sequence_gaps", "chunks that came after missing latents")):
            metric(f"{name}_total", "counter", help_, [("", values.get(name, 0))])
        now, windows = time.monotonic(), values.get("windows_cut", 0)
        if self._last is not None and now > self._last[0]:
            self._rate = (windows - self._last[1]) / (now - self._last[0])
        self._last = (now, windows)
        metric("windows_per_second", "gauge", "windows cut per second since the previous scrape", [("", self._rate)])
        dead = [(f'{{reason="{name[len("dead_letters_"):]}"}}', v) for name, v in sorted(values.items())
                if name.startswith("dead_letters_")]
        metric("dead_letters_total", "counter", "records sent to the dead-letter topic, by reason", dead)
        for name in ("operator_ms", "sink_ms"):
            d = values.get(name)
            if d is not None:
                metric(name, "summary", f"{name[:-3]} latency per batch, milliseconds",
                       [("_count", d.count), ("_sum", d.sum), ('{quantile="0"}', d.min), ('{quantile="1"}', d.max)])
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
