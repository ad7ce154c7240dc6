"""The project's own images for the test node, built from their Dockerfiles, never from test code.

``python -m tests.controlplane.project_images`` (run by ``.ci/setup --tests``) builds
``trainer_image/Dockerfile`` and ``operator/Dockerfile`` with buildah, Debian's daemonless
builder, and writes each as an OCI archive that the node's containerd imports. What this machine
cannot reach is replaced through the Dockerfiles' own build arguments, nothing else:

- the base: no registry is reachable, so ``python:3.11-slim-bookworm`` is played by a Debian
  bookworm root filesystem with python3.11 and its venv module, made by mmdebstrap from the same
  Debian mirror as the host's packages;
- the GPU wheels' index (download.pytorch.org): the trainer takes torch from PyPI, and TensorFlow
  as ``tensorflow-cpu`` (the build of the same version that pyproject's ``trainer`` extra pins),
  since no GPU is here to use the CUDA wheels.

pip inside the build reaches PyPI as the host does: the host's CA bundle and index settings are
mounted into each RUN step (never into the image), as a build machine behind a proxy would.

Each image is tagged ``cotrain.local/<name>:<hash>``, the hash of everything its build reads (the
Dockerfile, the files it copies, the build arguments, the base's recipe and this module), and its
archive is cached under ``$COTRAIN_CACHE/node-images`` beside the pause and busybox images. Tests
take an archive with :func:`project_image`, which never builds: building belongs in setup.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.controlplane.images import REGISTRY, LocalImage, cache_dir

REPO = Path(__file__).resolve().parents[2]
SETUP_COMMAND = "bash .ci/setup --tests"

BUILDAH = Path("/usr/bin/buildah")
MMDEBSTRAP = Path("/usr/bin/mmdebstrap")
# What python:3.11-slim-bookworm has that the Dockerfiles use: python (3.11 on bookworm) with
# venv and pip's bootstrap, useradd/groupadd (passwd is in every minbase) and CA certificates.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
BASE_REF = f"{REGISTRY}/python:3.11-slim-bookworm"
# Left out of the base as python:*-slim leaves them out.
BASE_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
HOST_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d/debian.sources"))
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

_SKIP_PARTS = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})


class ImageMissingError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProjectImage:
    name: str
    dockerfile: str  # relative to the repository root, the build context
    inputs: tuple[str, ...]  # what the Dockerfile copies from the context
    build_args: Mapping[str, str]
    target: str = ""  # the last stage when empty

    def files(self) -> Iterator[Path]:
        for entry in (self.dockerfile, *self.inputs):
            path = REPO / entry
            found = sorted(path.rglob("*")) if path.is_dir() else [path]
            for f in found:
                if f.is_file() and not _SKIP_PARTS.intersection(f.parts) and f.suffix != ".pyc":
                    yield f

    def tag(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.name}\0{self.target}\0{base_recipe()}\0".encode())
        for key in sorted(self.build_args):
            h.update(f"{key}={self.build_args[key]}\0".encode())
        for f in self.files():
            h.update(f"{f.relative_to(REPO)}\0".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        h.update(Path(__file__).read_bytes())
        return h.hexdigest()[:16]

    def ref(self) -> str:
        return f"{REGISTRY}/{self.name}:{self.tag()}"

    def archive(self) -> Path:
        return cache_dir() / f"{self.name}-{self.tag()}.oci.tar"


TRAINER = ProjectImage(
    "trainer",
    "trainer_image/Dockerfile",
    ("pyproject.toml", "README.md", "operator", "trainer_image"),
    {
        "PYTHON_IMAGE": BASE_REF,
        "TORCH_INDEX": "",
        "TORCH": "torch==2.13.0",
        "TENSORFLOW": "tensorflow-cpu==2.21.0",
    },
)
OPERATOR = ProjectImage(
    "operator",
    "operator/Dockerfile",
    (
        ".ci/constraints.txt",
        "pyproject.toml",
        "README.md",
        "operator",
        "trainer_image/cotrain_trainer",
    ),
    {"PYTHON_IMAGE": BASE_REF},
)
IMAGES = {image.name: image for image in (TRAINER, OPERATOR)}


def project_image(name: str) -> LocalImage:
    """The archive of the project image ``name`` for the current sources; never builds one."""
    image = IMAGES[name]
    archive = image.archive()
    if not archive.is_file():
        raise ImageMissingError(
            f"the {name} image for these sources is not built ({archive} is missing): "
            f"run {SETUP_COMMAND}"
        )
    return LocalImage(image.ref(), archive)


def base_recipe() -> str:
    return f"{BASE_SUITE} {' '.join(BASE_PACKAGES)} {' '.join(BASE_EXCLUDES)}"


# --------------------------------------------------------------------------
# building


def missing_tools() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["root (mmdebstrap --mode=root, buildah's storage)"]
    missing += [f"{p} (Debian package {p.name})" for p in (BUILDAH, MMDEBSTRAP) if not p.exists()]
    return missing


def _log(msg: str) -> None:
    print(f"project_images: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Builder:
    root: Path  # buildah's storage and run roots, and the lock

    def buildah(self, *args: str, capture: bool = False) -> str:
        argv = [
            str(BUILDAH),
            f"--root={self.root / 'storage'}",
            f"--runroot={self.root / 'run'}",
            "--storage-driver=overlay",
            *args,
        ]
        proc = subprocess.run(argv, check=False, text=True, capture_output=capture)
        if proc.returncode != 0:
            detail = proc.stderr.strip()[-4000:] if capture else "(its output is above)"
            raise RuntimeError(f"{' '.join(argv[:6])} ... failed ({proc.returncode}): {detail}")
        return proc.stdout.strip() if capture else ""

    def has(self, ref: str) -> bool:
        argv = [str(BUILDAH), f"--root={self.root / 'storage'}", f"--runroot={self.root / 'run'}"]
        argv += ["--storage-driver=overlay", "inspect", "--type=image", ref]
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0

    def base(self) -> str:
        """The stand-in for python:3.11-slim-bookworm, tagged by its recipe."""
        tag = hashlib.sha256(base_recipe().encode()).hexdigest()[:16]
        ref = f"{REGISTRY}/python:base-{tag}"
        if self.has(ref):
            return ref
        sources = [str(p) for p in HOST_SOURCES if p.is_file() and p.stat().st_size]
        if not sources:
            raise RuntimeError(
                f"no Debian sources on this host ({', '.join(map(str, HOST_SOURCES))})"
            )
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            rootfs = Path(tmp) / "rootfs.tar"
            argv = [
                str(MMDEBSTRAP),
                "--variant=minbase",
                "--mode=root",
                "--quiet",
                f"--include={','.join(BASE_PACKAGES)}",
                "--aptopt=APT::Install-Recommends false",
                *(f"--dpkgopt=path-exclude={p}" for p in BASE_EXCLUDES),
                # python:*-slim keeps the copyright files; so does this base.
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*",
                BASE_SUITE,
                str(rootfs),
                *sources,
            ]
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
            ctr = self.buildah("from", "scratch", capture=True)
            self.buildah("add", ctr, str(rootfs), "/")
            path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            self.buildah("config", f"--env={path}", "--env=LANG=C.UTF-8", "--cmd=python3", ctr)
            self.buildah("commit", "--rm", "--quiet", ctr, ref)
        return ref

    def build(self, image: ProjectImage) -> LocalImage:
        ref, archive = image.ref(), image.archive()
        if archive.is_file():
            _log(f"{ref}: reusing {archive}")
            return LocalImage(ref, archive)
        base = self.base()
        args = {**image.build_args, "PYTHON_IMAGE": base}
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            volumes = self._host_index_settings(Path(tmp))
            argv = [
                "bud",
                "--isolation=chroot",  # no container runtime inside the build; the host network
                "--network=host",
                "--pull=never",
                "--layers",  # the framework install is cached apart from the project's sources
                f"--file={REPO / image.dockerfile}",
                f"--tag={ref}",
                *(f"--build-arg={k}={v}" for k, v in sorted(args.items())),
                *(f"--volume={v}" for v in volumes),
            ]
            if image.target:
                argv.append(f"--target={image.target}")
            self.buildah(*argv, str(REPO))
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp_archive = archive.with_name(f"{archive.name}.tmp.{os.getpid()}")
        # zstd: a third of the trainer's size in seconds, where gzip would take a core for
        # minutes; containerd 1.6 unpacks it.
        self.buildah(
            "push", "--quiet", "--compression-format=zstd", ref, f"oci-archive:{tmp_archive}:{ref}"
        )  # fmt: skip
        tmp_archive.replace(archive)
        self._drop_older(image, ref, archive)
        return LocalImage(ref, archive)

    def tidy(self, *, prune: bool) -> None:
        """Remove working containers and their mounts (a failed or killed build leaves them);
        with ``prune``, every image too (CI: the archives are all that is used afterwards)."""
        self.buildah("rm", "--all", capture=True)
        self.buildah("umount", "--all", capture=True)
        if prune:
            self.buildah("rmi", "--all", "--force", capture=True)

    def _host_index_settings(self, tmp: Path) -> list[str]:
        """Mounts that let pip in a RUN step reach PyPI as the host does: the host's CA bundle
        and a pip.conf naming it (and the host's index, if it has its own)."""
        ca = Path(os.environ.get("PIP_CERT") or HOST_CA_BUNDLE)
        lines = ["[global]"]
        volumes = []
        if ca.is_file():
            volumes.append(f"{ca.resolve()}:/etc/ssl/certs/ca-certificates.crt:ro")
            lines.append("cert = /etc/ssl/certs/ca-certificates.crt")
        for key, env in (
            ("index-url", "PIP_INDEX_URL"),
            ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
        ):
            if os.environ.get(env):
                lines.append(f"{key} = {os.environ[env]}")
        conf = tmp / "pip.conf"
        conf.write_text("\n".join(lines) + "\n")
        volumes.append(f"{conf}:/etc/pip.conf:ro")
        return volumes

    def _drop_older(self, image: ProjectImage, keep: str, archive: Path) -> None:
        """Remove this image's older archives and tags; buildah's layer cache stays. What was
        just built is kept by name: its inputs may have changed while it was built."""
        for old in cache_dir().glob(f"{image.name}-*.oci.tar"):
            if old != archive:
                old.unlink(missing_ok=True)
        refs = self.buildah("images", "--format={{.Name}}:{{.Tag}}", capture=True).split()
        for old_ref in refs:
            if old_ref.startswith(f"{REGISTRY}/{image.name}:") and old_ref != keep:
                self.buildah("rmi", old_ref, capture=True)


def build_all(names: Sequence[str], *, prune: bool = False) -> list[LocalImage]:
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"cannot build the project's images here, missing: {', '.join(missing)}")
    root = cache_dir().parent / "buildah"
    root.mkdir(parents=True, exist_ok=True)
    builder = Builder(root)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time per cache
        built = []
        try:
            for name in names:
                t0 = time.monotonic()
                image = builder.build(IMAGES[name])
                size = image.archive.stat().st_size / 2**30
                _log(f"{image.ref}: {size:.2f} GiB, {time.monotonic() - t0:.0f} s")
                built.append(image)
        finally:
            builder.tidy(prune=prune)
        return built


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"of {', '.join(IMAGES)} (all)")
    parser.add_argument(
        "--prune", action="store_true", help="drop buildah's images and layer cache afterwards"
    )
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(IMAGES)
    if unknown:
        parser.error(f"no such image: {', '.join(sorted(unknown))}")
    for image in build_all(args.names or list(IMAGES), prune=args.prune):
        print(image.ref, image.archive)
    if shutil.which("df"):
        subprocess.run(["df", "-h", str(cache_dir())], check=False, stdout=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
