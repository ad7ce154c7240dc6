"""Who the operator is to the API server: the pod's ServiceAccount in a cluster, the kubeconfig
elsewhere.

Owns reading them into one `kopf.ConnectionInfo`, which kopf logs in with (its watches) and
`k8s.py` sends its own requests with, so both speak as the same user. Both read it again when
the API server answers 401: the kubelet rotates a pod's projected token.

The `kubernetes` client is not used for this. kopf would import it whenever it is installed
(22 MiB of an idle operator's 68, bench/README.md), and `__main__` keeps it out of the process.
What a kubeconfig may hold is what a service or a developer's cluster gives an operator: a
token, a token file, a client certificate, or a user name and password, with the cluster's CA
(file or data) or `insecure-skip-tls-verify`. An `exec` plugin or an `auth-provider` is refused
with a message that says so: running a cloud's login command is not the operator's job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kopf
import yaml

from cotrain_operator.api.contract import DEFAULT_SERVICEACCOUNT_DIR


class CredentialsError(Exception):
    """No way to log in: the message says what is missing or unsupported, and where."""


def load(environ: Mapping[str, str] | None = None) -> kopf.ConnectionInfo:
    """The pod's ServiceAccount when the operator runs in a cluster, else the kubeconfig."""
    environ = os.environ if environ is None else environ
    in_cluster = in_cluster_login(environ)
    return in_cluster if in_cluster is not None else kubeconfig_login(environ)


def in_cluster_login(
    environ: Mapping[str, str], directory: str = DEFAULT_SERVICEACCOUNT_DIR
) -> kopf.ConnectionInfo | None:
    """As client-go's in-cluster config: the API server's Service from the environment the
    kubelet sets, the token, CA and namespace the ServiceAccount mounts. None outside a pod."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    token_file = Path(directory, "token")
    if not host or not port or not token_file.is_file():
        return None
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    namespace_file = Path(directory, "namespace")
    return kopf.ConnectionInfo(
        server=f"https://{host}:{port}",
        ca_path=str(Path(directory, "ca.crt")),
        token=token_file.read_text(encoding="utf-8").strip(),
        default_namespace=(
            namespace_file.read_text(encoding="utf-8").strip() if namespace_file.is_file() else None
        ),
    )


def kubeconfig_login(environ: Mapping[str, str]) -> kopf.ConnectionInfo:
    """The current context of $KUBECONFIG (a list of files, merged as kubectl merges them: the
    first file to name a cluster, user, context or the current context wins), else
    ~/.kube/config. Relative paths in a file are relative to that file."""
    listed = [p for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    paths = [Path(p).expanduser() for p in listed] or [Path("~/.kube/config").expanduser()]
    current: str | None = None
    sections: dict[str, dict[str, tuple[Path, dict[str, Any]]]] = {
        "clusters": {},
        "users": {},
        "contexts": {},
    }
    read = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise CredentialsError(f"cannot read kubeconfig {path}: {error}") from error
        if not isinstance(config, dict):
            raise CredentialsError(f"kubeconfig {path} is not a mapping")
        read.append(path)
        current = current or config.get("current-context") or None
        for section, entries in sections.items():
            for item in config.get(section) or []:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    value = item.get(section[:-1]) or {}
                    entries.setdefault(item["name"], (path.parent, value))
    if not read:
        raise CredentialsError(
            "no credentials: not in a pod (KUBERNETES_SERVICE_HOST and the ServiceAccount "
            f"token), and no kubeconfig at {os.pathsep.join(map(str, paths))}"
        )
    if current is None:
        raise CredentialsError(f"no current-context in {os.pathsep.join(map(str, read))}")
    _, context = _entry(sections, "contexts", current)
    cluster_base, cluster = _entry(sections, "clusters", context.get("cluster"))
    user_base, user = _entry(sections, "users", context.get("user"))
    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported):
            raise CredentialsError(
                f"kubeconfig user {context.get('user')!r} logs in with {unsupported!r}, which "
                "the operator does not run: run it in the cluster (deploy/), or give it a "
                "kubeconfig with a token, a token file or a client certificate"
            )
    if not cluster.get("server"):
        raise CredentialsError(f"kubeconfig cluster {context.get('cluster')!r} has no server")
    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = _path(user_base, user["tokenFile"]).read_text(encoding="utf-8").strip()
    return kopf.ConnectionInfo(
        server=str(cluster["server"]).rstrip("/"),
        ca_path=_optional_path(cluster_base, cluster.get("certificate-authority")),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")) or None,
        token=token or None,
        username=user.get("username"),
        password=user.get("password"),
        certificate_path=_optional_path(user_base, user.get("client-certificate")),
        certificate_data=user.get("client-certificate-data"),
        private_key_path=_optional_path(user_base, user.get("client-key")),
        private_key_data=user.get("client-key-data"),
        default_namespace=context.get("namespace"),
    )


def _entry(
    sections: Mapping[str, Mapping[str, tuple[Path, dict[str, Any]]]], section: str, name: Any
) -> tuple[Path, dict[str, Any]]:
    found = sections[section].get(name) if isinstance(name, str) else None
    if found is None:
        raise CredentialsError(f"kubeconfig has no {section[:-1]} named {name!r}")
    base, value = found
    if not isinstance(value, dict):
        raise CredentialsError(f"kubeconfig {section[:-1]} {name!r} is not a mapping")
    return base, value


def _path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _optional_path(base: Path, value: Any) -> str | None:
    return str(_path(base, value)) if isinstance(value, str) and value else None
