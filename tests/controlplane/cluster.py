"""A real, local Kubernetes control plane for tests (envtest-style).

Runs etcd, kube-apiserver and (when built) kube-controller-manager as plain
processes on loopback ports, built from source by ``build.sh``. No Docker, no
kubelet, no scheduler: pods are stored but never run.

Only the standard library is required; ``cryptography`` is used for the
certificates when importable, otherwise the ``openssl`` CLI.

    bin_dir = build_control_plane()
    cp = start_control_plane(tmp_path, bin_dir)
    try:
        cp.kubectl("get", "ns")
    finally:
        cp.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"

ADMIN_USER = "cotrain-admin"
KCM_USER = "system:kube-controller-manager"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# Controllers run by kube-controller-manager: ownerReference garbage
# collection, namespace deletion (finalizers), the default ServiceAccount
# per namespace (needed by the ServiceAccount admission plugin for pods), and
# ResourceQuota usage (quota admission refuses pods until a quota is counted).
KCM_CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "resourcequota-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
)


class ControlPlaneError(RuntimeError):
    pass


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


# --------------------------------------------------------------------------
# building


def build_control_plane(*, log: IO[str] | None = None, env: dict[str, str] | None = None) -> Path:
    """Run build.sh (a no-op when the cached build matches) and return the bin dir.

    ``COTRAIN_CONTROLPLANE_BIN`` set to a directory skips the build entirely.
    build.sh's progress (stderr) goes to ``log`` (default: this process's stderr).
    """
    override = os.environ.get("COTRAIN_CONTROLPLANE_BIN")
    if override:
        return Path(override)
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=log if log is not None else None,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise ControlPlaneError(f"{BUILD_SCRIPT} printed no bin dir")
    return Path(lines[-1])


def go_available() -> bool:
    return bool(shutil.which("go")) or os.access("/usr/local/go/bin/go", os.X_OK)


# --------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    """Last n lines of a log, preceded by its last few klog error/fatal lines."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    tail = lines[-n:]
    errors = [ln for ln in lines[:-n] if ln[:1] in ("E", "F") and ln[1:5].isdigit()][-10:]
    if errors:
        return "\n".join(["[errors]", *errors, "[tail]", *tail])
    return "\n".join(tail)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # Linux: the child gets SIGKILL if the process that started it dies, so an
    # aborted pytest run leaves no etcd/apiserver behind.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pdeathsig_ok() -> bool:
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only use
    # it when starting from the main thread.
    return sys.platform.startswith("linux") and (
        threading.current_thread() is threading.main_thread()
    )


def _write_private(path: Path, data: str | bytes) -> None:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)


# --------------------------------------------------------------------------
# certificates


def _gen_certs_cryptography(d: Path, extra_ips: Sequence[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cotrain-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
        *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(d / "ca.key", pem_key(ca_key))
    (d / "apiserver.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(d / "apiserver.key", pem_key(key))
    _write_private(d / "sa.key", pem_key(sa_key))
    (d / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _gen_certs_openssl(d: Path, extra_ips: Sequence[str]) -> None:
    openssl = shutil.which("openssl")
    if not openssl:
        raise ControlPlaneError(
            "neither the 'cryptography' package nor the openssl CLI is available"
        )

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    run(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-sha256",
        "-days",
        "365",
        "-subj",
        "/CN=cotrain-test-ca",
        "-out",
        "ca.crt",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyCertSign,cRLSign",
    )
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "apiserver.key")
    run(
        "req",
        "-new",
        "-key",
        "apiserver.key",
        "-subj",
        "/CN=kube-apiserver",
        "-out",
        "apiserver.csr",
    )
    (d / "apiserver.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,"
        "IP:127.0.0.1,IP:10.0.0.1" + "".join(f",IP:{ip}" for ip in extra_ips) + "\n"
    )
    run(
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-sha256",
        "-days",
        "365",
        "-extfile",
        "apiserver.ext",
        "-out",
        "apiserver.crt",
    )
    run("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key")
    run("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
    for f in ("ca.key", "apiserver.key", "sa.key"):
        (d / f).chmod(0o600)


def generate_pki(d: Path, extra_ips: Sequence[str] = ()) -> None:
    """Write ca.crt/.key, apiserver.crt/.key (127.0.0.1, localhost, the "kubernetes" Service's
    IP and ``extra_ips``) and sa.key/.pub into d."""
    d.mkdir(parents=True, exist_ok=True)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        _gen_certs_openssl(d, extra_ips)
    else:
        _gen_certs_cryptography(d, extra_ips)


# --------------------------------------------------------------------------
# kubeconfig


def write_kubeconfig(
    path: Path,
    server: str,
    ca_file: Path,
    token: str,
    user: str = "user",
    namespace: str | None = None,
) -> Path:
    """Write a token kubeconfig (JSON, which is valid YAML) and return its path."""
    context: dict[str, str] = {"cluster": "cotrain-test", "user": user}
    if namespace:
        context["namespace"] = namespace
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "cotrain-test",
                "cluster": {"server": server, "certificate-authority": str(ca_file)},
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "cotrain-test", "context": context}],
        "current-context": "cotrain-test",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, json.dumps(cfg, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------
# processes


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        with contextlib.suppress(Exception):
            self.log_file.close()


def _spawn(
    name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> _Proc:
    log_file = open(log_path, "ab")  # noqa: SIM115 - closed by _Proc.stop()
    popen = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # Ctrl-C in the terminal does not hit it; stop() does
        preexec_fn=_die_with_parent if _pdeathsig_ok() else None,
    )
    return _Proc(name, popen, log_path, log_file)


_LIVE: list[ControlPlane] = []


@atexit.register
def _stop_all() -> None:
    for cp in list(_LIVE):
        with contextlib.suppress(Exception):
            cp.stop()


# --------------------------------------------------------------------------
# the control plane


@dataclass
class ControlPlane:
    server: str  # https://127.0.0.1:PORT
    kubeconfig: Path  # admin kubeconfig (system:masters)
    token: str  # static admin bearer token
    bin_dir: Path
    workdir: Path
    ca_file: Path
    etcd_url: str
    controller_manager: bool  # whether kube-controller-manager runs
    startup_seconds: dict[str, float] = field(default_factory=dict)
    _procs: list[_Proc] = field(default_factory=list, repr=False)

    # ---- processes -------------------------------------------------------

    @property
    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self._procs}

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM each process (controller-manager, apiserver, etcd), SIGKILL after timeout."""
        for p in reversed(self._procs):
            p.stop(timeout)
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- clients ---------------------------------------------------------

    def kubectl_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["KUBECACHEDIR"] = str(self.workdir / "kube-cache")
        env["KUBERC"] = "off"
        return env

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        as_user: str | None = None,
        as_groups: Sequence[str] = (),
        kubeconfig: Path | None = None,
        timeout: float = 60.0,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this control plane (admin unless told otherwise)."""
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}"]
        if as_user:
            argv.append(f"--as={as_user}")
        argv += [f"--as-group={g}" for g in as_groups]
        argv += list(args)
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=self.kubectl_env(),
            timeout=timeout,
            cwd=cwd,
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        token: str | None = None,
        timeout: float = 5.0,
    ) -> tuple[int, str]:
        """Call the API with a bearer token (admin by default); returns (status, body).

        body, when given, is sent as JSON.
        """
        headers = {"Authorization": f"Bearer {token or self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.server + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def get(self, path: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
        """GET an API path with a bearer token (admin by default); returns (status, body)."""
        return self.request("GET", path, token=token, timeout=timeout)

    def api_client_configuration(self, token: str | None = None):
        """A kubernetes.client.Configuration for this server (admin token by default)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.ca_file)
        cfg.verify_ssl = True
        cfg.api_key = {"authorization": token or self.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return cfg

    def api_client(self, token: str | None = None):
        """A new kubernetes.client.ApiClient (close it when done)."""
        from kubernetes import client

        return client.ApiClient(self.api_client_configuration(token))

    # ---- garbage collector -----------------------------------------------

    def wait_for_garbage_collector(
        self,
        api_version: str,
        kind: str,
        namespace: str = "default",
        timeout: float = 90.0,
    ) -> float:
        """Block until the garbage collector handles owners of a (new) kind; returns seconds.

        The garbage collector rediscovers API resources only every 30 s, so right
        after a CRD is created, dependents of its objects are not collected yet
        (and their retries back off, which can add another ~30 s). This probes
        with fresh ConfigMaps whose ownerReference points at a missing object of
        that kind until one is collected. Call it once after applying CRDs.
        """
        if not self.controller_manager:
            raise ControlPlaneError("kube-controller-manager is not running")
        base = f"/api/v1/namespaces/{namespace}/configmaps"
        start = time.monotonic()
        probes: list[str] = []
        try:
            while True:
                name = f"gc-probe-{secrets.token_hex(4)}"
                owner = {
                    "apiVersion": api_version,
                    "kind": kind,
                    "name": f"{name}-missing-owner",
                    "uid": str(uuid.uuid4()),
                }
                status, body = self.request(
                    "POST",
                    base,
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {"name": name, "ownerReferences": [owner]},
                    },
                )
                if status != 201:
                    raise ControlPlaneError(f"creating GC probe ConfigMap: HTTP {status}: {body}")
                probes.append(name)
                probe_deadline = time.monotonic() + 3
                while time.monotonic() < probe_deadline:
                    if self.get(f"{base}/{name}")[0] == 404:
                        probes.remove(name)
                        return time.monotonic() - start
                    time.sleep(0.1)
                if time.monotonic() - start > timeout:
                    raise ControlPlaneError(
                        f"garbage collector did not handle {api_version} {kind} after "
                        f"{timeout:.0f}s; last lines of kube-controller-manager.log:\n"
                        f"{_tail(self.log_path('kube-controller-manager'))}"
                    )
        finally:
            for name in probes:
                self.request("DELETE", f"{base}/{name}")

    # ---- service accounts ------------------------------------------------

    def wait_for_service_account(
        self, namespace: str, name: str = "default", timeout: float = 30.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status, _ = self.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"serviceaccount {namespace}/{name} not found after {timeout}s"
                )
            time.sleep(0.1)

    def service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        create: bool = True,
        duration: str = "1h",
        audiences: Sequence[str] = (),
        bound_pod: str | None = None,
    ) -> str:
        """A bound token for a ServiceAccount (TokenRequest API via `kubectl create token`);
        with `bound_pod`, bound to that pod as the kubelet's projected token is."""
        if create:
            proc = self.kubectl("create", "serviceaccount", name, "-n", namespace, check=False)
            if proc.returncode != 0 and "already exists" not in proc.stderr.lower():
                raise KubectlError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        args = ["create", "token", name, "-n", namespace, f"--duration={duration}"]
        args += [f"--audience={a}" for a in audiences]
        if bound_pod is not None:
            args += ["--bound-object-kind=Pod", f"--bound-object-name={bound_pod}"]
        return self.kubectl(*args).stdout.strip()

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path | None = None, **token_kw
    ) -> Path:
        """Write a kubeconfig that authenticates as system:serviceaccount:<namespace>:<name>."""
        token = self.service_account_token(namespace, name, **token_kw)
        bound = f"-{token_kw['bound_pod']}" if token_kw.get("bound_pod") else ""
        path = path or self.workdir / "kubeconfigs" / f"sa-{namespace}-{name}{bound}.kubeconfig"
        return write_kubeconfig(
            path,
            self.server,
            self.ca_file,
            token,
            user=f"system:serviceaccount:{namespace}:{name}",
            namespace=namespace,
        )


def _wait(
    what: str,
    check,
    procs: Sequence[_Proc],
    log: Path,
    timeout: float,
) -> float:
    start = time.monotonic()
    last = ""
    while True:
        for p in procs:
            if not p.alive():
                raise ControlPlaneError(
                    f"{p.name} exited with code {p.popen.returncode} while waiting for {what}; "
                    f"last lines of {p.log_path}:\n{_tail(p.log_path)}"
                )
        try:
            ok, last = check()
        except Exception as e:  # connection refused etc. while starting
            ok, last = False, repr(e)
        if ok:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise ControlPlaneError(
                f"timed out after {timeout:.0f}s waiting for {what} (last: {last[:500]}); "
                f"last lines of {log}:\n{_tail(log)}"
            )
        time.sleep(0.2)


def _http_ok(url: str, ctx: ssl.SSLContext | None = None, token: str | None = None):
    def check() -> tuple[bool, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                body = r.read().decode(errors="replace")
                return r.status == 200, body
        except urllib.error.HTTPError as e:
            return False, f"HTTP {e.code}: {e.read().decode(errors='replace')}"

    return check


def start_control_plane(
    workdir: Path,
    bin_dir: Path,
    *,
    controller_manager: bool | None = None,
    kcm_controllers: Sequence[str] = KCM_CONTROLLERS,
    disable_admission_plugins: Sequence[str] | None = None,
    extra_apiserver_args: Sequence[str] = (),
    address: str = "127.0.0.1",
    timeout: float = 60.0,
    verbosity: int = 1,
) -> ControlPlane:
    """Start etcd, kube-apiserver and (if built) kube-controller-manager under workdir.

    controller_manager: None = run it when bin_dir has it.
    disable_admission_plugins: None = ServiceAccount is disabled only when the
      controller-manager (which creates each namespace's "default"
      ServiceAccount) does not run.
    address: where the API server serves and what it advertises. Loopback for
      clients on this host only; a node's bridge address (which must exist) for
      pods too, and then the "kubernetes" Service's endpoints point at it.
    """
    workdir = Path(workdir).resolve()
    bin_dir = Path(bin_dir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for b in ("etcd", "kube-apiserver", "kubectl"):
        if not os.access(bin_dir / b, os.X_OK):
            raise ControlPlaneError(f"{bin_dir / b} is missing; run {BUILD_SCRIPT}")
    if controller_manager is None:
        controller_manager = os.access(bin_dir / "kube-controller-manager", os.X_OK)
    if disable_admission_plugins is None:
        disable_admission_plugins = () if controller_manager else ("ServiceAccount",)

    pki = workdir / "pki"
    loopback = ipaddress.ip_address(address).is_loopback
    generate_pki(pki, () if loopback else (address,))
    token = secrets.token_hex(24)
    kcm_token = secrets.token_hex(24)
    (pki / "tokens.csv").write_text(
        f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
        f'{kcm_token},{KCM_USER},{KCM_USER},"system:masters"\n'
    )
    (pki / "tokens.csv").chmod(0o600)

    env = dict(os.environ)
    procs: list[_Proc] = []
    timings: dict[str, float] = {}
    # Registered right away so that atexit also cleans up a half-started plane.
    cp = ControlPlane(
        server="",
        kubeconfig=workdir / "admin.kubeconfig",
        token=token,
        bin_dir=bin_dir,
        workdir=workdir,
        ca_file=pki / "ca.crt",
        etcd_url="",
        controller_manager=bool(controller_manager),
        startup_seconds=timings,
        _procs=procs,
    )
    _LIVE.append(cp)
    try:
        # ---- etcd ----
        client_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd_log = workdir / "etcd.log"
        t0 = time.monotonic()
        etcd = _spawn(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name=default",
                f"--data-dir={workdir / 'etcd-data'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",  # test data only: no fsync per write
                "--log-level=warn",
            ],
            etcd_log,
            env,
        )
        procs.append(etcd)
        cp.etcd_url = etcd_url
        _wait("etcd /health", _http_ok(f"{etcd_url}/health"), procs, etcd_log, timeout)
        timings["etcd"] = time.monotonic() - t0

        # ---- kube-apiserver ----
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        api_log = workdir / "kube-apiserver.log"
        for attempt in range(3):
            port = free_port()
            server = f"https://{address}:{port}"
            args = [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={address}",
                f"--advertise-address={address}",
                f"--secure-port={port}",
                f"--cert-dir={workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                "--profiling=false",
                f"--v={verbosity}",
            ]
            if loopback:
                # The lease endpoint reconciler refuses a loopback address for the
                # "kubernetes" Service endpoints; no pod here needs them.
                args.append("--endpoint-reconciler-type=none")
            if disable_admission_plugins:
                args.append(f"--disable-admission-plugins={','.join(disable_admission_plugins)}")
            args += list(extra_apiserver_args)
            t0 = time.monotonic()
            api = _spawn("kube-apiserver", args, api_log, env)
            procs.append(api)
            try:
                _wait(
                    "kube-apiserver /readyz",
                    _http_ok(f"{server}/readyz", ctx, token),
                    procs,
                    api_log,
                    timeout,
                )
                break
            except ControlPlaneError:
                if (
                    attempt < 2
                    and not api.alive()
                    and "address already in use" in _tail(api_log, 20)
                ):
                    procs.remove(api)
                    api.stop(5)
                    continue
                raise
        timings["kube-apiserver"] = time.monotonic() - t0
        cp.server = server
        write_kubeconfig(cp.kubeconfig, server, pki / "ca.crt", token, user=ADMIN_USER)

        # ---- kube-controller-manager ----
        if controller_manager:
            kcm_kubeconfig = write_kubeconfig(
                workdir / "kube-controller-manager.kubeconfig",
                server,
                pki / "ca.crt",
                kcm_token,
                user=KCM_USER,
            )
            kcm_log = workdir / "kube-controller-manager.log"
            kcm_port = free_port()
            t0 = time.monotonic()
            kcm = _spawn(
                "kube-controller-manager",
                [
                    str(bin_dir / "kube-controller-manager"),
                    f"--kubeconfig={kcm_kubeconfig}",
                    f"--authentication-kubeconfig={kcm_kubeconfig}",
                    f"--authorization-kubeconfig={kcm_kubeconfig}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={kcm_port}",
                    f"--cert-dir={workdir / 'kcm-certs'}",
                    f"--controllers={','.join(kcm_controllers)}",
                    f"--service-account-private-key-file={pki / 'sa.key'}",
                    f"--root-ca-file={pki / 'ca.crt'}",
                    "--use-service-account-credentials=false",
                    "--leader-elect=false",
                    f"--v={verbosity}",
                ],
                kcm_log,
                env,
            )
            procs.append(kcm)
            insecure = ssl.create_default_context()
            insecure.check_hostname = False
            insecure.verify_mode = ssl.CERT_NONE
            _wait(
                "kube-controller-manager /healthz",
                _http_ok(f"https://127.0.0.1:{kcm_port}/healthz", insecure),
                procs,
                kcm_log,
                timeout,
            )
            timings["kube-controller-manager"] = time.monotonic() - t0
    except BaseException:
        cp.stop(5)
        raise
    return cp
