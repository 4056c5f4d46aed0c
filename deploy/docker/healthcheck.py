"""Container health check: exit 0 when the worker's /healthz answers 200, else 1.

Docker's HEALTHCHECK runs this (the slim images have no curl). Kubernetes probes hit the same
endpoint over HTTP instead. Standard library only: it must work even if the app's imports break.
"""
import os
import sys
import urllib.request

port = os.environ.get("PRODCAT_METRICS_PORT", "9100")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:  # connection refused, timeout, HTTP 503 (HTTPError)
    print(f"unhealthy: {e}", file=sys.stderr)
    sys.exit(1)
