"""The `cotrain` command: `crd`, `validate`, `explain` (and `run`, the local trainer).

Owns argument parsing and what each subcommand prints; the work is done by the API package
(validation, CRD rendering) and by the supervisor (running members). Exit codes: 0 success,
1 invalid input or a failed job, 2 usage errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from cotrain_operator.api import KIND, CoTrainJob, InvalidJobError, parse_job
from cotrain_operator.api.crd import object_schema, render_crd_yaml
from cotrain_operator.api.models import CoTrainJobSpec, CoTrainJobStatus


def load_documents(path: str) -> Iterator[tuple[str, Any]]:
    """(label, document) for every YAML document in `path` ('-' reads stdin)."""
    if path == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        text, source = Path(path).read_text(encoding="utf-8"), path
    for index, document in enumerate(yaml.safe_load_all(text)):
        if document is not None:
            yield f"{source}#{index + 1}" if index else source, document


def load_job(path: str) -> CoTrainJob:
    """The one CoTrainJob in `path`; InvalidJobError (or ValueError) when there is not one."""
    jobs = [
        doc for _, doc in load_documents(path) if isinstance(doc, dict) and doc.get("kind") == KIND
    ]
    if len(jobs) != 1:
        raise ValueError(f"{path}: expected exactly one {KIND} document, found {len(jobs)}")
    return parse_job(jobs[0])


def validate_files(paths: Sequence[str], out: TextIO) -> int:
    """Print a verdict per CoTrainJob; return the number of invalid documents."""
    invalid = 0
    for path in paths:
        try:
            documents = list(load_documents(path))
        except (OSError, yaml.YAMLError) as error:
            out.write(f"{path}: cannot read: {error}\n")
            invalid += 1
            continue
        jobs = 0
        for label, document in documents:
            if not isinstance(document, dict):
                out.write(f"{label}: not a mapping: a CoTrainJob is a YAML object\n")
                invalid += 1
                continue
            if document.get("kind") != KIND:
                continue  # other manifests in the same file are not ours to judge
            jobs += 1
            name = (document.get("metadata") or {}).get("name", "<unnamed>")
            try:
                parse_job(document)
            except InvalidJobError as error:
                invalid += 1
                out.write(f"{label}: {KIND} {name} is invalid:\n")
                for violation in error.violations:
                    out.write(f"  {violation}\n")
            else:
                out.write(f"{label}: {KIND} {name} is valid\n")
        if jobs == 0 and documents:
            out.write(f"{path}: holds no {KIND} document\n")
            invalid += 1
    return invalid


def _explain(path: str, out: TextIO) -> int:
    parts = [p for p in path.split(".") if p]
    if parts and parts[0].lower() in (KIND.lower(), "cotrainjobs", "ctj"):
        parts = parts[1:]
    root: dict[str, Any] = {
        "description": (CoTrainJob.__doc__ or "").strip(),
        "type": "object",
        "properties": {
            "spec": object_schema(CoTrainJobSpec),
            "status": object_schema(CoTrainJobStatus),
        },
    }
    node = root
    for part in parts:
        node = node.get("items", node)
        properties = node.get("properties") or {}
        if part not in properties:
            known = ", ".join(properties) or "none"
            out.write(f"field {part!r} does not exist here; fields: {known}\n")
            return 1
        node = properties[part]
    item = node.get("items", node)
    out.write(f"FIELD: {'.'.join(parts) or KIND}  <{node.get('type', 'int-or-string')}>\n\n")
    out.write(f"DESCRIPTION:\n  {node.get('description', '')}\n")
    if "enum" in node:
        out.write(f"  One of: {', '.join(node['enum'])}\n")
    if "default" in node:
        out.write(f"  Default: {node['default']}\n")
    fields = item.get("properties") or {}
    if fields:
        out.write("\nFIELDS:\n")
        required = set(item.get("required", []))
        for name, sub in fields.items():
            flag = " -required-" if name in required else ""
            out.write(f"  {name}  <{sub.get('type', 'int-or-string')}>{flag}\n")
            out.write(f"    {sub.get('description', '')}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cotrain",
        description="Run PyTorch and TensorFlow training side by side on shared GPUs.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("crd", help="print the CoTrainJob CustomResourceDefinition")
    validate = commands.add_parser(
        "validate", help="check CoTrainJob YAML with the same rules as the CRD"
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="YAML files, or - for stdin")
    explain = commands.add_parser("explain", help="describe a CoTrainJob field")
    explain.add_argument("field", nargs="?", default="", help="e.g. spec.members.gpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = sys.stdout
    if args.command == "crd":
        out.write(render_crd_yaml())
        return 0
    if args.command == "validate":
        return 1 if validate_files(args.files, out) else 0
    if args.command == "explain":
        return _explain(args.field, out)
    raise AssertionError(f"unhandled command {args.command}")  # argparse rules this out


if __name__ == "__main__":
    sys.exit(main())
