"""Who the operator is to the API server (`credentials.py`), and the session that carries it
(`k8s.Session`): the pod's ServiceAccount in a cluster, the current context of a merged
$KUBECONFIG elsewhere, paths relative to their file, exec plugins refused by name; a 401 read
as a stale token, answered by reading the credentials again and trying once more."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from cotrain_operator import credentials
from cotrain_operator.credentials import CredentialsError
from cotrain_operator.k8s import ApiError, KubeApi, Session


def write(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def config(
    context: str = "dev",
    cluster: dict[str, Any] | None = None,
    user: dict[str, Any] | None = None,
    namespace: str | None = None,
    current: str | None = "dev",
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": context, "cluster": cluster or {"server": f"https://{context}:6443"}}
        ],
        "users": [{"name": context, "user": user if user is not None else {"token": context}}],
        "contexts": [
            {
                "name": context,
                "context": {"cluster": context, "user": context}
                | ({"namespace": namespace} if namespace else {}),
            }
        ],
    }
    if current:
        body["current-context"] = current
    return body


def test_in_a_pod_the_service_account_and_the_kubelets_environment(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("pod-token\n")
    (tmp_path / "ca.crt").write_text("CA")
    (tmp_path / "namespace").write_text("cotrain-system")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    info = credentials.in_cluster_login(env, str(tmp_path))
    assert info is not None
    assert info.server == "https://10.96.0.1:443"
    assert info.token == "pod-token"
    assert info.ca_path == str(tmp_path / "ca.crt")
    assert info.default_namespace == "cotrain-system"
    v6 = credentials.in_cluster_login(env | {"KUBERNETES_SERVICE_HOST": "fd00::1"}, str(tmp_path))
    assert v6 is not None
    assert v6.server == "https://[fd00::1]:443"
    assert credentials.in_cluster_login({}, str(tmp_path)) is None  # not in a pod
    assert credentials.in_cluster_login(env, str(tmp_path / "absent")) is None


def test_kubeconfig_list_merges_as_kubectl_does(tmp_path: Path) -> None:
    first = write(tmp_path / "a" / "config", config("first", current="second"))
    second = write(
        tmp_path / "b" / "config",
        config(
            "second",
            cluster={"server": "https://second:6443/", "certificate-authority": "ca.crt"},
            user={"tokenFile": "token", "client-certificate": "/abs/cert.pem"},
            namespace="team-a",
            current="first",  # the first file's current-context wins
        ),
    )
    (tmp_path / "b" / "token").write_text("from-file\n")
    info = credentials.kubeconfig_login({"KUBECONFIG": f"{first}:{tmp_path / 'missing'}:{second}"})
    assert info.server == "https://second:6443"
    assert info.ca_path == str(tmp_path / "b" / "ca.crt")  # relative to its own file
    assert info.token == "from-file"
    assert info.certificate_path == "/abs/cert.pem"
    assert info.default_namespace == "team-a"


def test_the_first_file_to_name_an_entry_wins(tmp_path: Path) -> None:
    one = write(tmp_path / "one", config("dev", user={"token": "one"}))
    two = write(tmp_path / "two", config("dev", user={"token": "two"}))
    assert credentials.kubeconfig_login({"KUBECONFIG": f"{one}:{two}"}).token == "one"
    assert credentials.kubeconfig_login({"KUBECONFIG": f"{two}:{one}"}).token == "two"


def test_home_kubeconfig_when_kubeconfig_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write(
        tmp_path / ".kube" / "config",
        config(user={"username": "admin", "password": "secret"}, cluster={"server": "http://h"}),
    )
    info = credentials.kubeconfig_login({})
    assert (info.server, info.username, info.password) == ("http://h", "admin", "secret")


@pytest.mark.parametrize(
    ("user", "says"),
    [
        ({"exec": {"command": "aws", "apiVersion": "client.authentication.k8s.io/v1"}}, "'exec'"),
        ({"auth-provider": {"name": "gcp"}}, "'auth-provider'"),
    ],
)
def test_a_login_command_is_refused_by_name(
    tmp_path: Path, user: dict[str, Any], says: str
) -> None:
    path = write(tmp_path / "config", config(user=user))
    with pytest.raises(CredentialsError) as refused:
        credentials.kubeconfig_login({"KUBECONFIG": str(path)})
    assert says in str(refused.value)
    assert "'dev'" in str(refused.value)
    assert "run it in the cluster" in str(refused.value)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (config(current=None), "no current-context"),
        (config(current="other"), "no context named 'other'"),
        (config(cluster={"insecure-skip-tls-verify": True}), "has no server"),
        (["not", "a", "mapping"], "is not a mapping"),
    ],
)
def test_an_unusable_kubeconfig_says_what_is_missing(tmp_path: Path, body: Any, says: str) -> None:
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(CredentialsError, match=says):
        credentials.kubeconfig_login({"KUBECONFIG": str(path)})


def test_no_credentials_at_all_names_both_ways(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError) as refused:
        credentials.load({"KUBECONFIG": str(tmp_path / "none")})
    assert "KUBERNETES_SERVICE_HOST" in str(refused.value)
    assert str(tmp_path / "none") in str(refused.value)


class FakeServer:
    """An API server that accepts one token at a time, counting what it was sent."""

    def __init__(self) -> None:
        self.valid = "old"
        self.seen: list[tuple[str, str, str | None, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                auth = self.headers.get("Authorization")
                server.seen.append((self.command, self.path, auth, body))
                if auth != f"Bearer {server.valid}":
                    self._answer(401, {"kind": "Status", "message": "Unauthorized"})
                elif self.headers.get("Content-Type") != "application/merge-patch+json":
                    self._answer(415, {"kind": "Status", "message": "wrong content type"})
                else:
                    self._answer(200, {"status": body["status"]})

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def test_a_401_reads_the_token_again_and_tries_once_more(server: FakeServer) -> None:
    tokens = iter(["old", "new", "newer"])
    logins: list[str] = []

    def login() -> kopf.ConnectionInfo:
        logins.append(token := next(tokens))
        return kopf.ConnectionInfo(server=server.url, token=token)

    api = KubeApi(Session(login, connections=2), threads=2)
    status = {"phase": "Running"}
    assert api._request(
        "PATCH", "/x/status", {"status": status}, None, "application/merge-patch+json"
    ) == {"status": status}
    server.valid = "new"  # the kubelet rotated the token
    answer = api._request(
        "PATCH",
        "/x/status",
        {"status": status},
        {"fieldManager": "m"},
        "application/merge-patch+json",
    )
    assert answer == {"status": status}
    assert logins == ["old", "new"]
    assert [(path, auth) for _, path, auth, _ in server.seen] == [
        ("/x/status", "Bearer old"),
        ("/x/status?fieldManager=m", "Bearer old"),
        ("/x/status?fieldManager=m", "Bearer new"),
    ]
    server.valid = "none of them"  # a second 401 in a row is the answer
    with pytest.raises(ApiError) as refused:
        api._request("PATCH", "/x/status", {"status": status}, None, "application/merge-patch+json")
    assert refused.value.status == 401
    assert "Unauthorized" in (refused.value.body or "")
    assert logins == ["old", "new", "newer"]


def test_basic_auth_and_the_error_body(server: FakeServer) -> None:
    info = kopf.ConnectionInfo(server=server.url, username="admin", password="pw")
    api = KubeApi(Session(lambda: info, connections=1), threads=1)
    with pytest.raises(ApiError) as refused:
        api._request("PATCH", "/x", {"status": {}}, None)
    pair = base64.b64encode(b"admin:pw").decode()
    assert server.seen[0][2] == f"Basic {pair}"
    # Basic is not the token the fake wants: 401, read again (the same), 401.
    assert refused.value.status == 401
    assert len(server.seen) == 2
