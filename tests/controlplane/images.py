"""Local container images for the test node, made without a registry or a container engine.

This module owns the OCI image-layout archive packer (one uncompressed layer, reproducible bytes:
sorted entries, mtime 0, owner 0:0) and the two images the node needs: the pod sandbox image
(the ``pause`` binary that build.sh builds) and a tiny test image (Debian's static busybox
with a few applet links). Archives are cached under ``$COTRAIN_CACHE/node-images`` by a hash of
their inputs, and each image's tag is that hash, so a changed input is a new reference. The
node's containerd imports them with ``ctr images import`` (see node.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REGISTRY = "cotrain.local"  # never resolved: images only ever come from imported archives
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static (node-setup.sh installs it)
BUSYBOX_APPLETS = ("sh", "echo", "cat", "ls", "sleep", "id", "env", "true", "false")
# The image's user when a pod names none; the restricted profile wants non-root anyway.
NOBODY = "65534:65534"

_LAYER = "application/vnd.oci.image.layer.v1.tar"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass(frozen=True)
class Entry:
    """One path in an image's single layer: a copied file, a symlink or a directory."""

    path: str  # inside the image, without a leading "/"
    source: Path | None = None  # a regular file to copy
    link: str | None = None  # a symlink's target
    mode: int = 0o755

    def digest_input(self) -> bytes:
        content = self.source.read_bytes() if self.source is not None else b""
        head = f"{self.path}\0{self.link}\0{self.mode:o}\0".encode()
        return head + hashlib.sha256(content).digest()


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    user: str = NOBODY
    env: Sequence[str] = ("PATH=/bin",)


@dataclass(frozen=True)
class LocalImage:
    ref: str  # e.g. cotrain.local/pause:0123456789abcdef
    archive: Path  # OCI image-layout tarball for `ctr images import`


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _layer(entries: Sequence[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in sorted(entries, key=lambda e: e.path):
            if e.source is not None:
                data = e.source.read_bytes()
                tar.addfile(_tarinfo(e.path, tarfile.REGTYPE, e.mode, len(data)), io.BytesIO(data))
            elif e.link is not None:
                tar.addfile(_tarinfo(e.path, tarfile.SYMTYPE, 0o777, link=e.link))
            else:
                tar.addfile(_tarinfo(e.path, tarfile.DIRTYPE, e.mode))
    return buf.getvalue()


def _descriptor(media_type: str, blob: bytes) -> dict[str, object]:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
    }


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def pack_oci_archive(dest: Path, ref: str, entries: Sequence[Entry], config: ImageConfig) -> None:
    """Write an OCI image-layout tarball holding one image named ``ref`` to ``dest``."""
    layer = _layer(entries)
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    image_config = _json(
        {
            "architecture": _arch(),
            "os": "linux",
            "config": {
                "Entrypoint": list(config.entrypoint) or None,
                "Cmd": list(config.cmd) or None,
                "Env": list(config.env),
                "User": config.user,
                "WorkingDir": "/",
            },
            # Uncompressed layer: its diff ID is its digest.
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created_by": "tests/controlplane/images.py"}],
        }
    )
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": _MANIFEST,
            "config": _descriptor(_CONFIG, image_config),
            "layers": [_descriptor(_LAYER, layer)],
        }
    )
    tag = ref.rsplit(":", 1)[1]
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": _INDEX,
            "manifests": [
                {
                    **_descriptor(_MANIFEST, manifest),
                    # containerd names the imported image after this annotation.
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
    )
    files: list[tuple[str, bytes]] = [
        ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
        ("index.json", index),
    ]
    for blob in (layer, image_config, manifest):
        files.append((f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}", blob))
    tmp = dest.with_name(f"{dest.name}.tmp.{os.getpid()}")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            tar.addfile(_tarinfo(d, tarfile.DIRTYPE, 0o755))
        for name, data in files:
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    tmp.replace(dest)  # atomic: a concurrent reader sees the whole archive or none


def cache_dir() -> Path:
    root = os.environ.get("COTRAIN_CACHE") or str(Path.home() / ".cache" / "cotrain")
    return Path(root) / "node-images"


def cached_image(name: str, entries: Sequence[Entry], config: ImageConfig) -> LocalImage:
    """The image ``cotrain.local/<name>:<hash of its inputs>``, packed once per input."""
    h = hashlib.sha256(name.encode())
    for e in sorted(entries, key=lambda e: e.path):
        h.update(e.digest_input())
    h.update(_json([list(config.entrypoint), list(config.cmd), config.user, list(config.env)]))
    h.update(Path(__file__).read_bytes())  # a packer change is a new image too
    tag = h.hexdigest()[:16]
    ref = f"{REGISTRY}/{name}:{tag}"
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    archive = d / f"{name}-{tag}.oci.tar"
    if not archive.exists():
        pack_oci_archive(archive, ref, entries, config)
    return LocalImage(ref, archive)


def _rootfs_dirs() -> list[Entry]:
    # Mount points runc would otherwise have to create in a root filesystem that pods mount
    # read-only; /tmp is world-writable for images used without an emptyDir.
    return [Entry(d, mode=0o755) for d in ("bin", "dev", "etc", "proc", "sys")] + [
        Entry("tmp", mode=0o1777)
    ]


def pause_image(node_bin_dir: Path) -> LocalImage:
    """The pod sandbox image: build.sh's static ``pause`` as the only program."""
    return cached_image(
        "pause",
        [*_rootfs_dirs(), Entry("pause", source=node_bin_dir / "pause")],
        ImageConfig(entrypoint=["/pause"]),
    )


def busybox_image() -> LocalImage:
    """A small test image: the static busybox, with ``/bin/sh`` and a few applets as links."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing; run tests/controlplane/node-setup.sh")
    links = [Entry(f"bin/{a}", link="busybox") for a in BUSYBOX_APPLETS]
    return cached_image(
        "busybox",
        [*_rootfs_dirs(), Entry("bin/busybox", source=BUSYBOX), *links],
        ImageConfig(cmd=["/bin/sh"]),
    )
