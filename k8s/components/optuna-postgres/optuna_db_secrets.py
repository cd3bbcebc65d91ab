"""Generate the Optuna database's credentials inside the cluster (the Job optuna-db-secrets runs it).

In the Job's namespace it makes sure that

- the Secret ``$PG_SECRET`` (optuna-postgres: ``username``, ``password``, ``database``, the postgres
  pod's POSTGRES_*) exists; a new one gets a random password, an existing one is kept, because the
  data volume was initialised with it;
- the Secret ``$OPTUNA_SECRET`` (optuna-db) holds ``url``, the SQLAlchemy URL of that database through
  its Service, which the pipeline's tuning tasks read as OPTUNA_STORAGE.

Standard library only (it runs in the plain python image), with the pod's service-account token. No
password is printed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
LABELS = {"app.kubernetes.io/component": "optuna-db", "app.kubernetes.io/part-of": "inventory-monitor"}
CRED_KEYS = ("username", "password", "database")
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class SecretsApi(Protocol):
    def get(self, name: str) -> dict[str, str] | None: ...
    def create(self, name: str, data: Mapping[str, str]) -> bool: ...
    def patch(self, name: str, data: Mapping[str, str]) -> None: ...


def storage_url(creds: Mapping[str, str], host: str, port: str) -> str:
    """The Optuna storage URL (psycopg2, the driver in the components image)."""
    return f"postgresql+psycopg2://{creds['username']}:{creds['password']}@{host}:{port}/{creds['database']}"


def ensure(api: SecretsApi, env: Mapping[str, str]) -> list[str]:
    """Create or reuse the database credentials, then write the URL Secret; returns what it did."""
    namespace = env["NAMESPACE"]
    pg_secret = env.get("PG_SECRET", "optuna-postgres")
    url_secret = env.get("OPTUNA_SECRET", "optuna-db")
    done: list[str] = []
    creds = api.get(pg_secret)
    if creds is None:
        new = {
            "username": env.get("PG_USER", "optuna"),
            "password": secrets.token_hex(24),
            "database": env.get("PG_DATABASE", "optuna"),
        }
        for key in ("username", "database"):
            if not _NAME_RE.match(new[key]):
                raise SystemExit(f"error: {key} {new[key]!r}: use lower-case letters, digits and '_'")
        if api.create(pg_secret, new):
            creds = new
            done.append(f"created Secret {pg_secret} with a random password")
        else:  # another run created it first: use that one
            creds = api.get(pg_secret)
    missing = [k for k in CRED_KEYS if not (creds or {}).get(k)]
    if creds is None or missing:
        raise SystemExit(f"error: Secret {pg_secret} lacks {', '.join(missing)}: delete it to regenerate")
    host = f"{env['PG_SERVICE']}.{namespace}.svc.{env.get('CLUSTER_DOMAIN', 'cluster.local')}"
    url = storage_url(creds, host, env.get("PG_PORT", "5432"))
    current = api.get(url_secret)
    if current is None and api.create(url_secret, {"url": url}):
        done.append(f"created Secret {url_secret} (url for {host})")
    elif (current or {}).get("url") != url:
        api.patch(url_secret, {"url": url})
        done.append(f"updated Secret {url_secret} (url for {host})")
    return done or [f"Secrets {pg_secret} and {url_secret} are up to date"]


def _b64(data: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


class KubeSecrets:
    """The core/v1 Secrets of one namespace over the API server's REST interface."""

    def __init__(self, base_url: str, token: str, context: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.context = context

    @classmethod
    def in_cluster(cls, namespace: str, sa_dir: Path = SA_DIR) -> KubeSecrets:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        host = f"[{host}]" if ":" in host else host  # IPv6
        return cls(
            f"https://{host}:{port}/api/v1/namespaces/{namespace}/secrets",
            (sa_dir / "token").read_text().strip(),
            ssl.create_default_context(cafile=str(sa_dir / "ca.crt")),
        )

    def _call(self, method: str, url: str, body: Any = None, content_type: str = "application/json") -> Any:
        req = urllib.request.Request(
            url,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/json",
                "Content-Type": content_type,
            },
        )
        with urllib.request.urlopen(req, timeout=30, context=self.context) as resp:
            return json.load(resp)

    def get(self, name: str) -> dict[str, str] | None:
        try:
            obj = self._call("GET", f"{self.base_url}/{name}")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}

    def create(self, name: str, data: Mapping[str, str]) -> bool:
        """False when the Secret already exists (another run created it first)."""
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "labels": LABELS},
            "type": "Opaque",
            "data": _b64(data),
        }
        try:
            self._call("POST", self.base_url, body)
        except urllib.error.HTTPError as e:
            if e.code == 409:
                return False
            raise
        return True

    def patch(self, name: str, data: Mapping[str, str]) -> None:
        self._call("PATCH", f"{self.base_url}/{name}", {"data": _b64(data)}, "application/merge-patch+json")


def main() -> int:
    try:
        for line in ensure(KubeSecrets.in_cluster(os.environ["NAMESPACE"]), os.environ):
            print(line)
    except urllib.error.HTTPError as e:
        detail = e.read()[:500].decode(errors="replace")
        print(f"error: {e.url}: HTTP {e.code} {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
