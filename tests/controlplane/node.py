"""A real Kubernetes node for tests, beside a ControlPlane from cluster.py.

This module owns everything the node is: its PKI
(the kubelet's serving certificate, the API server's client certificate for kubelets, client
certificates for the kubelet and the scheduler), its network (a Linux bridge whose address is the
node IP, a CNI bridge + host-local config, no masquerading and no route out), and its processes:
containerd (own config, root, state and socket under the node's workdir; runc), kube-scheduler
and the kubelet. ``Node.stop()`` takes it all down again, pods included.

It needs root and Debian's containerd, runc, containernetworking-plugins and busybox-static
(``tests/controlplane/node-setup.sh`` installs them). The control plane must be started with
``node_control_plane_args(pki)`` (kubelet client certificate, node lifecycle controller)::

    pki = NodePKI.create(workdir / "node-pki")
    cp = start_control_plane(workdir / "cp", cp_bin, **node_control_plane_args(pki))
    node = Node.start(cp, cp_bin, workdir / "node", pki, images=[busybox_image()])
    try:
        cp.kubectl("get", "nodes")
    finally:
        node.stop()
        cp.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tests.controlplane.cluster import (
    KCM_CONTROLLERS,
    SERVICE_CLUSTER_IP_RANGE,
    ControlPlane,
    ControlPlaneError,
    _Proc,
    _spawn,
    _tail,
    _wait,
    free_port,
    write_kubeconfig,
)
from tests.controlplane.images import LocalImage, pause_image

HERE = Path(__file__).resolve().parent
SETUP_SCRIPT = HERE / "node-setup.sh"

NODE_NAME = "cotrain-node"
BRIDGE = "cotrain0"
# A private /24 on the bridge: .1 is the node IP (and the pods' on-link neighbour), pods get
# .10 and up. Nothing routes it anywhere.
POD_SUBNET = "10.213.0.0/24"
KUBELET_PORT = 10250
APISERVER_KUBELET_CLIENT = "kube-apiserver-kubelet-client"
SCHEDULER_USER = "system:kube-scheduler"
# Beyond cluster.py's controllers: the node lifecycle controller removes the
# node.kubernetes.io/not-ready taint that every new Node starts with (the scheduler places no
# pod on a tainted node), and the root CA publisher creates each namespace's kube-root-ca.crt
# ConfigMap, without which the kubelet cannot mount a pod's service-account token volume.
# The operator runs as a Deployment (deployment and replicaset controllers), and Services get
# their EndpointSlices (what cluster DNS answers for headless Services) as on any cluster.
NODE_KCM_CONTROLLERS = (
    *KCM_CONTROLLERS,
    "node-lifecycle-controller",
    "root-ca-certificate-publisher-controller",
    "deployment-controller",
    "replicaset-controller",
    "endpointslice-controller",
)
# Debian's package paths.
CONTAINERD = Path("/usr/bin/containerd")
CTR = Path("/usr/bin/ctr")
RUNC = Path("/usr/sbin/runc")
CNI_BIN_DIR = Path("/usr/lib/cni")
IPTABLES = Path("/usr/sbin/iptables")
# The nat chain that plays kube-proxy for the one Service IP pods use (node.py's only rules).
SERVICE_CHAIN = "COTRAIN-SERVICES"
# The kubelet serves its device-plugin registration here whatever its --root-dir says
# (deviceplugin/v1beta1.DevicePluginPath): one node at a time per host.
DEVICE_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
CLUSTER_DOMAIN = "cluster.local"
# What CoreDNS's kubernetes plugin reads (it always watches namespaces).
_COREDNS_RBAC: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "List",
    "items": [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["services", "namespaces", "pods"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        },
    ],
}
_PLUGIN_PREFIX = "fake-gpu-plugin-"  # its processes' names, one per resource
# Unix sockets carry at most 107 bytes of path.
_MAX_SOCKET_PATH = 100


class NodeError(ControlPlaneError):
    pass


# --------------------------------------------------------------------------
# building and prerequisites


def missing_prerequisites() -> list[str]:
    """What this host lacks to run a node (empty when it can)."""
    missing = [] if os.geteuid() == 0 else ["root (bridges, mounts, cgroups)"]
    needed = (CONTAINERD, CTR, RUNC, IPTABLES, CNI_BIN_DIR / "bridge", CNI_BIN_DIR / "host-local")
    missing += [str(p) for p in needed if not os.access(p, os.X_OK)]
    if not shutil.which("ip"):
        missing.append("ip (iproute2)")
    if not shutil.which("openssl"):
        missing.append("openssl")
    return missing


# --------------------------------------------------------------------------
# certificates (openssl CLI, as cluster.py falls back to)


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NodeError(f"openssl {' '.join(args)} failed: {proc.stderr}")


def _new_ca(d: Path, stem: str, cn: str) -> tuple[Path, Path]:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{stem}.key", cwd=d)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        f"{stem}.key",
        "-sha256",
        "-days",
        "365",
        "-subj",
        f"/CN={cn}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyCertSign,cRLSign",
        "-out",
        f"{stem}.crt",
        cwd=d,
    )
    (d / f"{stem}.key").chmod(0o600)
    return d / f"{stem}.crt", d / f"{stem}.key"


def _issue(
    d: Path,
    stem: str,
    ca: tuple[Path, Path],
    subject: str,
    *,
    server_sans: Sequence[str] = (),
) -> tuple[Path, Path]:
    """A certificate signed by ``ca``: a client one, or a server one when given SANs."""
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{stem}.key", cwd=d)
    _openssl("req", "-new", "-key", f"{stem}.key", "-subj", subject, "-out", f"{stem}.csr", cwd=d)
    ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature"]
    if server_sans:
        ext += ["extendedKeyUsage=serverAuth", "subjectAltName=" + ",".join(server_sans)]
    else:
        ext.append("extendedKeyUsage=clientAuth")
    (d / f"{stem}.ext").write_text("\n".join(ext) + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{stem}.csr",
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        # An explicit serial: -CAcreateserial would write a .srl file beside the CA, which for
        # the control plane's CA is cluster.py's directory.
        "-set_serial",
        str(secrets.randbits(63)),
        "-sha256",
        "-days",
        "365",
        "-extfile",
        f"{stem}.ext",
        "-out",
        f"{stem}.crt",
        cwd=d,
    )
    (d / f"{stem}.key").chmod(0o600)
    return d / f"{stem}.crt", d / f"{stem}.key"


@dataclass(frozen=True)
class NodePKI:
    """What must exist before the API server starts: the kubelets' CA, the kubelet's serving
    certificate, and the client certificate the API server shows kubelets (logs, exec)."""

    dir: Path
    node_name: str
    node_ip: str
    ca: Path  # signs the two below; the kubelet trusts it for clients, the API server for kubelets
    kubelet_serving: tuple[Path, Path]
    apiserver_client: tuple[Path, Path]
    pod_subnet: str  # the node IP is its first address

    @classmethod
    def create(cls, d: Path, node_name: str = NODE_NAME, pod_subnet: str = POD_SUBNET) -> NodePKI:
        d.mkdir(parents=True, exist_ok=True)
        node_ip = node_ip_for(pod_subnet)
        ca = _new_ca(d, "kubelet-ca", "cotrain-test-kubelet-ca")
        serving = _issue(
            d, "kubelet", ca, f"/CN={node_name}", server_sans=[f"IP:{node_ip}", f"DNS:{node_name}"]
        )
        client = _issue(d, "apiserver-kubelet-client", ca, f"/CN={APISERVER_KUBELET_CLIENT}")
        return cls(d, node_name, node_ip, ca[0], serving, client, pod_subnet)

    def apiserver_args(self) -> list[str]:
        return [
            f"--kubelet-client-certificate={self.apiserver_client[0]}",
            f"--kubelet-client-key={self.apiserver_client[1]}",
            # Verify the kubelet's serving certificate (the default is not to).
            f"--kubelet-certificate-authority={self.ca}",
            # The Node's Hostname address (its name) resolves nowhere; reach it by its IP.
            "--kubelet-preferred-address-types=InternalIP",
        ]


def node_ip_for(pod_subnet: str) -> str:
    return str(next(ipaddress.ip_network(pod_subnet).hosts()))


def node_control_plane_args(pki: NodePKI, bridge: str = BRIDGE) -> dict[str, Any]:
    """Keyword arguments for cluster.start_control_plane so that a Node can join it, and its
    pods reach it: the API server serves on the node IP, so this makes the node's bridge (the
    one Node.start then uses) first."""
    _ensure_bridge(bridge, f"{pki.node_ip}/{ipaddress.ip_network(pki.pod_subnet).prefixlen}")
    return {
        "kcm_controllers": NODE_KCM_CONTROLLERS,
        "extra_apiserver_args": pki.apiserver_args(),
        "address": pki.node_ip,
    }


# --------------------------------------------------------------------------
# host state


def _run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _ensure_bridge(name: str, cidr: str) -> None:
    """The node's bridge holding ``cidr``; one left by an aborted run is ours by name."""
    if not _link_exists(name):
        _run("ip", "link", "add", name, "type", "bridge")
    _run("ip", "addr", "flush", "dev", name)
    _run("ip", "addr", "add", cidr, "dev", name)
    _run("ip", "link", "set", name, "up")


def resolve(server: str, name: str, port: int = 53, timeout: float = 2.0) -> list[str]:
    """The A records ``server`` gives for ``name`` over UDP: [] for none, NXDOMAIN, a refusal
    or no answer in time. A few lines of RFC 1035, since no DNS client is installed here."""
    query_id = secrets.randbelow(1 << 16)
    question = b"".join(bytes([len(part)]) + part.encode() for part in name.split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + b"\0\1\0\1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(packet, (server, port))
            reply = sock.recv(4096)
        except OSError:
            return []
    got_id, flags, _, count = struct.unpack(">HHHH", reply[:8])
    if got_id != query_id or flags & 0xF:  # not ours, or an error rcode
        return []
    at = 12 + len(question) + 4
    found = []
    for _ in range(count):
        if reply[at] & 0xC0 == 0xC0:  # a compressed name: two bytes
            at += 2
        else:
            while reply[at]:
                at += reply[at] + 1
            at += 1
        kind, _, _, length = struct.unpack(">HHIH", reply[at : at + 10])
        at += 10
        if kind == 1 and length == 4:
            found.append(".".join(str(b) for b in reply[at : at + 4]))
        at += length
    return found


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(str(IPTABLES), "-w", "-t", "nat", *args, check=check)


def _clear_service_routes() -> None:
    """Remove SERVICE_CHAIN and the jump to it; left by an aborted run, they are ours by name."""
    listed = _iptables("-S", "PREROUTING", check=False).stdout.splitlines()
    for rule in listed:
        if rule.endswith(f"-j {SERVICE_CHAIN}"):
            _iptables("-D", *rule.split()[1:], check=False)
    if _iptables("-L", SERVICE_CHAIN, "-n", check=False).returncode == 0:
        _iptables("-F", SERVICE_CHAIN)
        _iptables("-X", SERVICE_CHAIN)


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces etc. octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                found.append(point)
    return found


def _unmount_all(root: Path) -> list[str]:
    left = _mounts_under(root)
    for point in sorted(left, key=len, reverse=True):  # children first
        _run("umount", "-l", point, check=False)
    return left


# --------------------------------------------------------------------------
# the node


_LIVE: list[Node] = []


@atexit.register
def _stop_all() -> None:
    for node in list(_LIVE):
        with contextlib.suppress(Exception):
            node.stop()


@dataclass
class Node:
    control_plane: ControlPlane
    name: str
    ip: str
    bridge: str
    workdir: Path
    bin_dir: Path
    containerd_socket: Path
    startup_seconds: dict[str, float] = field(default_factory=dict)
    _procs: list[_Proc] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)
    _gpu_plugins: dict[str, FakeGpus] = field(default_factory=dict, repr=False)
    _gpu_labels: dict[str, str] = field(default_factory=dict, repr=False)
    _kubelet_healthz_port: int = field(default=0, repr=False)

    # ---- start -----------------------------------------------------------

    @classmethod
    def start(
        cls,
        cp: ControlPlane,
        bin_dir: Path,
        workdir: Path,
        pki: NodePKI,
        *,
        images: Iterable[LocalImage] = (),
        bridge: str = BRIDGE,
        timeout: float = 120.0,
        verbosity: int = 2,
    ) -> Node:
        """Start containerd, kube-scheduler and the kubelet; return once the Node is Ready and
        untainted. ``images`` are imported into containerd first (the pause image always is)."""
        missing = missing_prerequisites()
        if missing:
            raise NodeError(f"this host cannot run a node, it lacks: {', '.join(missing)}")
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        socket = workdir / "containerd" / "containerd.sock"
        if len(str(socket)) + len(".ttrpc") > _MAX_SOCKET_PATH:
            raise NodeError(f"workdir {workdir} is too long for containerd's unix sockets")
        node = cls(cp, pki.node_name, pki.node_ip, bridge, workdir, bin_dir.resolve(), socket)
        _LIVE.append(node)
        try:
            node._start(pki, list(images), timeout, verbosity)
        except BaseException:
            node.stop()
            raise
        return node

    def _start(
        self,
        pki: NodePKI,
        images: list[LocalImage],
        timeout: float,
        verbosity: int,
    ) -> None:
        t_all = time.monotonic()
        pod_subnet = pki.pod_subnet
        prefix = ipaddress.ip_network(pod_subnet).prefixlen
        _ensure_bridge(self.bridge, f"{self.ip}/{prefix}")
        self._route_services()
        pause = pause_image(self.bin_dir)
        self._start_containerd(pause, pod_subnet)
        t0 = time.monotonic()
        for image in [pause, *images]:
            self.import_image(image)
        self.startup_seconds["images"] = time.monotonic() - t0
        kubelet_kubeconfig, scheduler_kubeconfig = self._identities()
        self._start_scheduler(scheduler_kubeconfig, timeout)
        self._start_cluster_dns(timeout)
        self._start_kubelet(pki, kubelet_kubeconfig, timeout, verbosity)
        self.startup_seconds["total"] = time.monotonic() - t_all

    def _route_services(self, timeout: float = 30.0) -> None:
        """What kube-proxy would do for the one Service IP pods here use: the "kubernetes"
        Service's ClusterIP:443 (in-cluster config's KUBERNETES_SERVICE_HOST) is DNATed, for
        packets from the bridge only, to the API server on the node IP. Headless Services need
        no proxy; no other Service is routed."""
        api = urlparse(self.control_plane.server)
        if api.hostname != self.ip:
            raise NodeError(
                f"the API server serves on {api.hostname}, pods reach only the node IP {self.ip}: "
                "start the control plane with node_control_plane_args(pki)"
            )

        def service() -> tuple[bool, str]:
            status, body = self.control_plane.get("/api/v1/namespaces/default/services/kubernetes")
            return status == 200, body

        api_log = self.control_plane.workdir / "kube-apiserver.log"
        _wait("the kubernetes Service", service, [], api_log, timeout)
        svc = json.loads(service()[1])
        port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "https")
        _clear_service_routes()
        _iptables("-N", SERVICE_CHAIN)
        _iptables("-A", "PREROUTING", "-i", self.bridge, "-j", SERVICE_CHAIN)
        _iptables(
            "-A", SERVICE_CHAIN, "-d", f"{svc['spec']['clusterIP']}/32", "-p", "tcp",
            "--dport", str(port), "-j", "DNAT", "--to-destination", f"{self.ip}:{api.port}",
        )  # fmt: skip

    def _start_containerd(self, pause: LocalImage, pod_subnet: str) -> None:
        d = self.workdir / "containerd"
        net_d = self.workdir / "cni" / "net.d"
        for sub in (d, net_d):
            sub.mkdir(parents=True, exist_ok=True)
        self._write_cni_config(net_d, pod_subnet)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""\
version = 2
root = "{d / "root"}"
state = "{d / "state"}"
# Snapshotters this host cannot use; they only log errors at every start.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{self.containerd_socket}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "opt"}"

[{cri}]
  sandbox_image = "{pause.ref}"
  # Root here lacks CAP_SYS_RESOURCE: without this, runc fails every sandbox with
  # "can't get final child's PID from pipe: EOF" (it cannot lower oom_score_adj).
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  BinaryName = "{RUNC}"
  # runc's state of this containerd's containers, apart from any other containerd's.
  Root = "{d / "runc"}"
  # The kubelet's cgroupDriver is cgroupfs: both must agree.
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{net_d}"
  max_conf_num = 1
"""
        cfg = d / "config.toml"
        cfg.write_text(config)
        env = dict(os.environ)
        # containerd finds containerd-shim-runc-v2 on PATH.
        env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        log = self.workdir / "containerd.log"
        t0 = time.monotonic()
        proc = _spawn("containerd", [str(CONTAINERD), f"--config={cfg}"], log, env)
        self._procs.append(proc)

        def ready() -> tuple[bool, str]:
            if not self.containerd_socket.exists():
                return False, "no socket yet"
            r = self.ctr("version", check=False)
            return r.returncode == 0, r.stderr

        _wait("containerd", ready, [proc], log, 30)
        self.startup_seconds["containerd"] = time.monotonic() - t0

    def _write_cni_config(self, net_d: Path, pod_subnet: str) -> None:
        conflist = {
            "cniVersion": "1.0.0",
            "name": "cotrain-pods",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    # The bridge already holds the node IP (.1); isGateway would also switch on
                    # the host's net.ipv4.ip_forward. Pods reach .1 on-link without it.
                    "isGateway": False,
                    "ipMasq": False,  # nothing leaves this machine
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        # Pods get their on-link /24 and a route to the Service range through
                        # the node; no default route, nothing else leaves the bridge.
                        "ranges": [[{"subnet": pod_subnet, "rangeStart": _nth(pod_subnet, 10)}]],
                        "routes": [{"dst": SERVICE_CLUSTER_IP_RANGE, "gw": self.ip}],
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                }
            ],
        }
        # containerd runs the loopback plugin itself for every sandbox (go-cni's lo network).
        (net_d / "10-cotrain.conflist").write_text(json.dumps(conflist, indent=2) + "\n")

    def _identities(self) -> tuple[Path, Path]:
        """Client certificates from the control plane's CA, and their RBAC bindings."""
        cp = self.control_plane
        pki = cp.workdir / "pki"
        ca = (pki / "ca.crt", pki / "ca.key")
        d = self.workdir / "pki"
        d.mkdir(parents=True, exist_ok=True)
        kubelet = _issue(d, "kubelet-client", ca, f"/O=system:nodes/CN=system:node:{self.name}")
        scheduler = _issue(d, "scheduler-client", ca, f"/CN={SCHEDULER_USER}")
        # The API server authorizes with RBAC only (no Node authorizer): bind the kubelet's user
        # to system:node, and let the API server's kubelet client use the kubelet API.
        # system:kube-scheduler has its bootstrap bindings already.
        bindings = [
            ("cotrain-node-kubelet", "system:node", f"system:node:{self.name}"),
            (
                "cotrain-node-apiserver-kubelet-client",
                "system:kubelet-api-admin",
                APISERVER_KUBELET_CLIENT,
            ),
        ]
        items = [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": role,
                },
                "subjects": [
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}
                ],
            }
            for name, role, user in bindings
        ]
        cp.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )
        return (
            _cert_kubeconfig(self.workdir / "kubelet.kubeconfig", cp, *kubelet),
            _cert_kubeconfig(self.workdir / "kube-scheduler.kubeconfig", cp, *scheduler),
        )

    def _start_scheduler(self, kubeconfig: Path, timeout: float) -> None:
        port = free_port()
        log = self.workdir / "kube-scheduler.log"
        t0 = time.monotonic()
        proc = _spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--leader-elect=false",
                "--v=1",
            ],
            log,
        )
        self._procs.append(proc)
        _wait("kube-scheduler /healthz", _https_ok(port), [proc], log, timeout)
        self.startup_seconds["kube-scheduler"] = time.monotonic() - t0

    def _start_cluster_dns(self, timeout: float) -> None:
        """CoreDNS (build.sh's, with the kubernetes plugin) on the node IP's port 53, as the
        coredns ServiceAccount with the read access its kubernetes plugin needs. It answers for
        cluster.local only: nothing here resolves names outside the cluster."""
        cp = self.control_plane
        cp.kubectl("apply", "-f", "-", input=json.dumps(_COREDNS_RBAC))
        kubeconfig = cp.service_account_kubeconfig(
            "kube-system", "coredns", create=False, duration="24h"
        )
        health = free_port()
        corefile = self.workdir / "Corefile"
        zones = f"{CLUSTER_DOMAIN} in-addr.arpa ip6.arpa"
        corefile.write_text(
            f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {self.ip}
    errors
    health 127.0.0.1:{health}
    kubernetes {zones} {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    loadbalance
}}
"""
        )
        log = self.workdir / "coredns.log"
        t0 = time.monotonic()
        proc = _spawn("coredns", [str(self.bin_dir / "coredns"), f"-conf={corefile}"], log)
        self._procs.append(proc)
        # Its /ready says ready before the DNS listener is up: ask it a real question.
        service = f"kubernetes.default.svc.{CLUSTER_DOMAIN}"

        def answers() -> tuple[bool, str]:
            found = resolve(self.ip, service, timeout=0.5)
            return bool(found), str(found)

        _wait(f"CoreDNS answering for {service}", answers, [proc], log, timeout)
        self.startup_seconds["coredns"] = time.monotonic() - t0

    def _start_kubelet(
        self, pki: NodePKI, kubeconfig: Path, timeout: float, verbosity: int
    ) -> None:
        root = self.workdir / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        healthz_port = self._kubelet_healthz_port = free_port()
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # Serve only on the node IP (the bridge), where the API server reaches it.
            "address": self.ip,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            "tlsCertFile": str(pki.kubelet_serving[0]),
            "tlsPrivateKeyFile": str(pki.kubelet_serving[1]),
            # Clients: the API server's client certificate; bearer tokens are checked with the
            # API server, and every request is authorized by a SubjectAccessReview.
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca)},
            },
            "authorization": {"mode": "Webhook"},
            # This host's cgroup v1 (hybrid) hierarchy has no systemd to delegate to, and the
            # kubelet refuses cgroup v1 unless told not to.
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            # CoreDNS on the node IP (_start_cluster_dns): pods resolve Services and the
            # headless Services' pod names for real.
            "clusterDNS": [self.ip],
            "clusterDomain": CLUSTER_DOMAIN,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "podLogsDir": str(self.workdir / "pod-logs"),
            # Pods get no upstream resolvers beside the cluster DNS: the host's are outside the
            # pod network.
            "resolvConf": "",
            "failSwapOn": False,
            # The imported images cannot be pulled again: never garbage-collect them, and do not
            # evict pods because a shared test disk is fuller than a real node's would be.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "registerNode": True,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
        }
        cfg = self.workdir / "kubelet-config.json"  # JSON is YAML
        cfg.write_text(json.dumps(config, indent=2) + "\n")
        log = self.workdir / "kubelet.log"
        t0 = time.monotonic()
        proc = _spawn(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                f"--config={cfg}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.ip}",
                f"--root-dir={root}",
                f"--cert-dir={root / 'pki'}",
                f"--v={verbosity}",
            ],
            log,
        )
        self._procs.append(proc)
        last: dict[str, str] = {}

        def ready() -> tuple[bool, str]:
            status, body = self.control_plane.get(f"/api/v1/nodes/{self.name}")
            if status != 200:
                return False, f"HTTP {status}"
            obj = json.loads(body)
            conds = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
            ok = conds.get("Ready", {}).get("status") == "True"
            taints = obj.get("spec", {}).get("taints") or []
            last["state"] = f"Ready={conds.get('Ready', {})} taints={taints}"
            return ok and not taints, last["state"]

        _wait(f"Node {self.name} Ready and untainted", ready, [proc], log, timeout)
        self.startup_seconds["kubelet"] = time.monotonic() - t0

    def restart(self, name: str, *, crash: bool = False, timeout: float = 60.0) -> None:
        """Stop the node's ``name`` process ("kubelet", "containerd") and start it again with the
        same command line, as a node agent's restart does: SIGTERM, or SIGKILL with ``crash``
        (no cleanup at all). Containers outlive both (containerd's shims hold them). Returns
        once it serves again: containerd's socket answers, the kubelet's /healthz is ok."""
        old = next(p for p in self._procs if p.name == name)
        if crash:
            with contextlib.suppress(ProcessLookupError):
                os.kill(old.pid, signal.SIGKILL)
            old.popen.wait(timeout)
        old.stop(timeout)
        env = dict(os.environ)
        env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        new = _spawn(name, [str(a) for a in old.popen.args], old.log_path, env)  # type: ignore[union-attr]
        self._procs[self._procs.index(old)] = new
        if name == "containerd":

            def serving() -> tuple[bool, str]:
                r = self.ctr("version", check=False)
                return r.returncode == 0, r.stderr

        elif name == "kubelet":
            url = f"http://127.0.0.1:{self._kubelet_healthz_port}/healthz"

            def serving() -> tuple[bool, str]:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = r.read().decode()
                    return r.status == 200 and body == "ok", body

        else:
            raise NodeError(f"restart: no readiness check for {name}")
        _wait(f"{name} serving again", serving, [new], new.log_path, timeout)

    # ---- GPUs --------------------------------------------------------------

    def use_gpus(self, gpus: FakeGpus, labels: dict[str, str], timeout: float = 30.0) -> None:
        """Make the node a GPU node of one kind: ``gpus`` advertised by fake-gpu-plugin and
        ``labels`` (what GPU Feature Discovery would label it with) on the Node. Whatever GPUs
        and labels it had before are replaced; the same kind again is a no-op. Pods still
        holding the old devices keep them until they end, as on a node whose plugin changed."""
        if self._gpu_plugins == {gpus.resource: gpus} and self._gpu_labels == labels:
            return
        for proc in [p for p in self._procs if p.name.startswith(_PLUGIN_PREFIX)]:
            proc.stop(10)
            self._procs.remove(proc)
        self._gpu_plugins.clear()
        stale = [f"{key}-" for key in self._gpu_labels if key not in labels]
        self._gpu_labels = {}
        new = [f"{key}={value}" for key, value in labels.items()]
        self.control_plane.kubectl("label", "node", self.name, "--overwrite", *stale, *new)
        self._gpu_labels = dict(labels)
        self._start_gpu_plugin(gpus, timeout)

    def _start_gpu_plugin(self, gpus: FakeGpus, timeout: float) -> None:
        """Start fake-gpu-plugin (build.sh's stand-in for NVIDIA's device plugin) and wait until
        the Node's allocatable shows its devices: registered through the kubelet's own
        device-plugin gRPC API, so the kubelet allocates them and merges the plugin's env and
        mounts into each container that asks."""
        self._gpu_plugins[gpus.resource] = gpus
        name = _PLUGIN_PREFIX + gpus.resource.replace("/", "-")
        argv = [
            str(self.bin_dir / "fake-gpu-plugin"),
            f"-plugin-dir={DEVICE_PLUGIN_DIR}",
            f"-resource={gpus.resource}",
            f"-devices={gpus.devices}",
        ]
        if gpus.mps:
            argv.append(f"-mps-root={self.mps_root}")
        log = self.workdir / f"{name}.log"
        proc = _spawn(name, argv, log)
        self._procs.append(proc)

        def advertised() -> tuple[bool, str]:
            status, body = self.control_plane.get(f"/api/v1/nodes/{self.name}")
            if status != 200:
                return False, f"HTTP {status}"
            allocatable = json.loads(body).get("status", {}).get("allocatable", {})
            return allocatable.get(gpus.resource) == str(gpus.devices), str(allocatable)

        _wait(f"{gpus.devices} {gpus.resource} on {self.name}", advertised, [proc], log, timeout)

    @property
    def mps_root(self) -> Path:
        """Where the fake MPS daemon's pipe directory and /dev/shm live on the host."""
        return self.workdir / "mps"

    # ---- use -------------------------------------------------------------

    @property
    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self._procs}

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log_tail(self, name: str, n: int = 40) -> str:
        return _tail(self.log_path(name), n)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """containerd's CLI against this node's containerd, in the CRI's k8s.io namespace."""
        return _run(
            str(CTR),
            f"--address={self.containerd_socket}",
            "--namespace=k8s.io",
            *args,
            check=check,
        )

    def import_image(self, image: LocalImage, timeout: float = 600) -> float:
        """Import ``image`` into the node's containerd (unpacked for the CRI); return the
        seconds it took: a few GiB, as the trainer image is, take a minute or more."""
        t0 = time.monotonic()
        _run(
            str(CTR),
            f"--address={self.containerd_socket}",
            "--namespace=k8s.io",
            "images",
            "import",
            str(image.archive),
            timeout=timeout,
        )
        return time.monotonic() - t0

    # ---- stop ------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the kubelet, remove every pod sandbox through the CRI (containers, veths and
        netns go with them), stop containerd and the scheduler, unmount what is left under the
        workdir, delete the bridge and the Node object. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        errors: list[str] = []
        by_name = {p.name: p for p in self._procs}
        if "kubelet" in by_name:
            by_name["kubelet"].stop(timeout)  # first, or it would restart the pods we remove
        containerd = by_name.get("containerd")
        if containerd is not None and containerd.alive():
            reset = _run(
                str(self.bin_dir / "cri-reset"), f"unix://{self.containerd_socket}", check=False
            )
            if reset.returncode != 0:
                errors.append(f"cri-reset: {reset.stderr.strip()}")
        for p in reversed(self._procs):
            p.stop(timeout)
        # A stopped kubelet leaves mounted what it mounted: its root dir bind-mounted onto itself
        # (a shared mount, for mount propagation) and the volumes (tmpfs for projected tokens)
        # of pods that were still running. Nothing else uses them now.
        _unmount_all(self.workdir)
        # containerd's content and snapshots: the imported images, unpacked (the trainer's is
        # several GiB). pytest keeps the last runs' temporary directories; the logs beside them
        # are worth keeping, these are not.
        shutil.rmtree(self.workdir / "containerd" / "root", ignore_errors=True)
        with contextlib.suppress(NodeError):
            _clear_service_routes()
        if _link_exists(self.bridge):
            _run("ip", "link", "del", self.bridge, check=False)
        with contextlib.suppress(Exception):
            if self.control_plane.server:
                self.control_plane.request("DELETE", f"/api/v1/nodes/{self.name}")
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)
        if errors:
            raise NodeError("node teardown: " + "; ".join(errors))

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class FakeGpus:
    """Fake GPUs a node advertises through fake-gpu-plugin: `devices` units of `resource`,
    answered as NVIDIA's plugin answers in MPS mode when `mps`."""

    resource: str = "nvidia.com/gpu"
    devices: int = 1
    mps: bool = False


def _nth(subnet: str, n: int) -> str:
    return str(ipaddress.ip_network(subnet).network_address + n)


def _cert_kubeconfig(path: Path, cp: ControlPlane, cert: Path, key: Path) -> Path:
    """A kubeconfig with a client certificate (cluster.write_kubeconfig writes token ones)."""
    write_kubeconfig(path, cp.server, cp.ca_file, token="unused")
    cfg = json.loads(path.read_text())
    cfg["users"][0]["user"] = {"client-certificate": str(cert), "client-key": str(key)}
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def _https_ok(port: int) -> Callable[[], tuple[bool, str]]:
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE  # the component's self-signed serving certificate

    def check() -> tuple[bool, str]:
        url = f"https://127.0.0.1:{port}/healthz"
        with urllib.request.urlopen(url, context=insecure, timeout=2) as r:
            return r.status == 200, r.read().decode(errors="replace")

    return check
