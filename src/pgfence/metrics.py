"""Prometheus metrics of one `pgfence run`: plain counters, and an opt-in text endpoint.

The holder and its renewer write plain attributes (single assignments, atomic under the
GIL); the endpoint's thread only reads them. Nothing here can block the supervisor: the
HTTP server runs in its own daemon thread and is off unless --metrics-address is given.
"""

from __future__ import annotations

from pgfence import __version__, clock
from pgfence.errors import UsageError
from pgfence.timings import stale_after


class Metrics:
    def __init__(
        self, backend: str, mode: str, deadline: float | None, interval: float = 2.0
    ) -> None:
        self.backend = backend
        self.mode = mode
        self.deadline = deadline
        # /healthz: a heartbeat is fresh as `check` judges it (two intervals and a
        # second), and in lease mode never older than the self-fence deadline.
        self.fresh_within = stale_after(interval)
        if deadline is not None:
            self.fresh_within = min(self.fresh_within, deadline)
        self.holding = 0
        self.generation = 0
        self.last_renewal: float | None = None  # monotonic start of the last good renewal
        self.renewal_seconds_last = 0.0
        self.renewal_seconds_sum = 0.0
        self.renewals = 0
        self.renewal_failures = 0
        self.self_fences = 0

    def acquired(self, generation: int, when: float) -> None:
        self.generation = generation
        self.last_renewal = when
        self.holding = 1

    def renewed(self, started: float, took: float) -> None:
        self.last_renewal = started
        self.renewal_seconds_last = took
        self.renewal_seconds_sum += took
        self.renewals += 1

    def renewal_failed(self) -> None:
        self.renewal_failures += 1

    def fenced(self) -> None:
        self.self_fences += 1
        self.holding = 0

    def released(self) -> None:
        self.holding = 0

    def health(self) -> tuple[bool, str]:
        """(healthy, why): holding the fence with a fresh heartbeat, as `check` says."""
        if not self.holding or self.last_renewal is None:
            return False, "unhealthy: not holding the fence"
        age = clock.now() - self.last_renewal
        if age > self.fresh_within:
            return False, (
                f"unhealthy: holding the fence, but the last renewal started {age:.1f} s ago "
                f"(fresh within {self.fresh_within:.3g} s)"
            )
        return True, f"healthy: holding generation {self.generation}, renewed {age:.1f} s ago"

    def render(self) -> str:
        age = 0.0 if self.last_renewal is None else clock.now() - self.last_renewal
        rows = [
            (
                "pgfence_info",
                "gauge",
                "pgfence build and configuration",
                f'{{version="{__version__}",backend="{self.backend}",mode="{self.mode}"}}',
                1,
            ),
            ("pgfence_holding", "gauge", "1 while this process holds the fence", "", self.holding),
            ("pgfence_generation", "gauge", "fencing token of the held fence", "", self.generation),
            (
                "pgfence_lease_age_seconds",
                "gauge",
                "seconds since the last successful renewal started",
                "",
                age if self.holding else 0,
            ),
            (
                "pgfence_lease_deadline_seconds",
                "gauge",
                "self-fence deadline (0: strict mode, none)",
                "",
                self.deadline or 0,
            ),
            (
                "pgfence_renewal_latency_seconds",
                "gauge",
                "duration of the last renewal",
                "",
                self.renewal_seconds_last,
            ),
            (
                "pgfence_renewal_seconds_total",  # counters end in _total (parsers insist)
                "counter",
                "total time spent renewing",
                "",
                self.renewal_seconds_sum,
            ),
            ("pgfence_renewals_total", "counter", "successful renewals", "", self.renewals),
            (
                "pgfence_renewal_failures_total",
                "counter",
                "failed renewals",
                "",
                self.renewal_failures,
            ),
            (
                "pgfence_self_fences_total",
                "counter",
                "times the server was killed to fence it",
                "",
                self.self_fences,
            ),
        ]
        lines = []
        for name, kind, text, labels, value in rows:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name}{labels} {value:g}"]
        return "\n".join(lines) + "\n"


def serve(address: str, metrics: Metrics) -> None:
    """Serve `metrics` at http://ADDRESS/metrics, and its health at /healthz (200 or
    503, for an httpGet probe), from a daemon thread."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    host, _, port_text = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise UsageError(f"--metrics-address {address!r} must be HOST:PORT or :PORT")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/healthz":
                healthy, why = metrics.health()
                self.reply(200 if healthy else 503, "text/plain; charset=utf-8", why + "\n")
                return
            if path not in ("/metrics", "/"):
                self.send_error(404)
                return
            self.reply(200, "text/plain; version=0.0.4; charset=utf-8", metrics.render())

        def reply(self, status: int, content_type: str, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes are not events

    try:
        server = ThreadingHTTPServer((host, int(port_text)), Handler)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {address}: {exc.strerror}") from None
    server.daemon_threads = True
    from pgfence import signals

    thread = threading.Thread(target=server.serve_forever, name="pgfence-metrics", daemon=True)
    signals.start_thread(thread)
