"""nginx for the stage, configured from the k8s Ingress annotations (one source of truth):
k8s/base/ingress.yaml for REST, k8s/components/grpc-ingress/ingress.yaml for gRPC.

What each annotation becomes (as ingress-nginx renders it):

- ``proxy-body-size`` -> ``client_max_body_size``;
- ``proxy-read-timeout`` / ``proxy-send-timeout`` -> ``proxy_*_timeout`` (REST) and
  ``grpc_*_timeout`` (gRPC), in seconds;
- ``proxy-request-buffering: "off"`` -> ``proxy_request_buffering off``;
- ``proxy-next-upstream`` / ``proxy-next-upstream-tries`` -> ``proxy_next_upstream`` /
  ``grpc_next_upstream`` and their ``_tries``; ingress-nginx adds ``non_idempotent`` when the
  controller's ConfigMap says ``retry-non-idempotent: "true"`` (:data:`RETRY_NON_IDEMPOTENT`,
  k8s/README.md): every API behind these paths is a prediction, a pure function of its input,
  so sending a POST again to another gateway costs capacity, never correctness.

No gateway is taken out of rotation for its answers (``max_fails=0``): ingress-nginx balances
in Lua over one placeholder ``server``, so nginx's passive health marking never applies there;
a gateway leaves the rotation when its readiness fails (the Endpoints). Without it, two 503s
(each gateway refusing one request during a model-server restart) would mark every gateway
down for ``fail_timeout`` and nginx would answer 502 "no live upstreams" for 10 s.

The upstreams list the gateways whose readiness passes (stage/cluster.py's ``Endpoints``
rewrites this file and reloads nginx). Like ingress-nginx, upstream connections are not kept
alive by default here; each request opens its own, so a gateway whose listener closed is
skipped on connect, which nginx
retries whatever the method. Bodies are streamed to the gateway (``proxy-request-buffering:
"off"``; gRPC always), so nginx cannot resend a request once it has started sending it: a
reset after that, or a gRPC status in trailers, reaches the client, and gRPC clients retry
UNAVAILABLE themselves (stage/load.py, classifier_client).
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
REST_INGRESS = ROOT / "k8s" / "base" / "ingress.yaml"
GRPC_INGRESS = ROOT / "k8s" / "components" / "grpc-ingress" / "ingress.yaml"
PREFIX = "nginx.ingress.kubernetes.io/"
# The ingress-nginx controller's ConfigMap key retry-non-idempotent (k8s/README.md asks for "true").
RETRY_NON_IDEMPOTENT = True


def annotations(path: Path) -> dict[str, str]:
    """An Ingress's ingress-nginx annotations, without their prefix."""
    meta = yaml.safe_load(path.read_text())["metadata"]
    return {k.removeprefix(PREFIX): str(v) for k, v in (meta.get("annotations") or {}).items() if k.startswith(PREFIX)}


def routed_paths(path: Path) -> list[tuple[str, str]]:
    """(path, pathType) of every rule of an Ingress."""
    spec = yaml.safe_load(path.read_text())["spec"]
    return [(p["path"], p["pathType"]) for rule in spec["rules"] for p in rule["http"]["paths"]]


def _policy(a: dict[str, str], kind: str) -> list[str]:
    """The directives an Ingress's annotations make, for ``kind`` proxy (REST) or grpc."""
    out = [f"client_max_body_size {a.get('proxy-body-size', '1m')};",
           f"{kind}_read_timeout {a.get('proxy-read-timeout', '60')}s;",
           f"{kind}_send_timeout {a.get('proxy-send-timeout', '60')}s;",
           f"{kind}_connect_timeout {a.get('proxy-connect-timeout', '5')}s;"]
    when = a.get("proxy-next-upstream", "error timeout").split()  # ingress-nginx's default
    if RETRY_NON_IDEMPOTENT and "non_idempotent" not in when:
        when.append("non_idempotent")
    out += [f"{kind}_next_upstream {' '.join(when)};",
            f"{kind}_next_upstream_tries {a.get('proxy-next-upstream-tries', '3')};"]
    if kind == "proxy" and a.get("proxy-request-buffering") == "off":
        out.append("proxy_request_buffering off;")
    return out


def _location(path: str, path_type: str) -> str:
    return f"location = {path}" if path_type == "Exact" else f"location {path}"


def render(rest_port: int, grpc_port: int, gateways_rest: list[str], gateways_grpc: list[str], prefix: Path) -> str:
    """nginx.conf: REST on ``rest_port`` (the REST Ingress's paths), gRPC (h2c) on ``grpc_port``;
    ``gateways_*`` are "host:port" of every gateway; ``prefix`` holds its logs and temp files."""
    rest, grpc = annotations(REST_INGRESS), annotations(GRPC_INGRESS)
    ind = "\n        "
    locations = "".join(
        f"\n        {_location(p, t)} {{ proxy_pass http://gateways_rest; }}" for p, t in routed_paths(REST_INGRESS))
    return f"""# Rendered by stage/nginx.py from {REST_INGRESS.relative_to(ROOT)} and {GRPC_INGRESS.relative_to(ROOT)}.
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream gateways_rest {{{''.join(f'{ind}server {g} max_fails=0;' for g in gateways_rest)}
    }}
    upstream gateways_grpc {{{''.join(f'{ind}server {g} max_fails=0;' for g in gateways_grpc)}
    }}
    server {{
        listen 127.0.0.1:{rest_port};
        {ind.join(_policy(rest, 'proxy'))}
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_set_header X-Request-ID $http_x_request_id;{locations}
        location / {{ return 404; }}
    }}
    server {{
        listen 127.0.0.1:{grpc_port} http2;
        {ind.join(_policy(grpc, 'grpc'))}
        location / {{ grpc_pass grpc://gateways_grpc; }}
    }}
}}
"""
