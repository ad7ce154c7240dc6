"""`python -m cotrain_operator`: run the operator.

Watches every namespace unless --namespace is given; liveness at
http://0.0.0.0:8081/healthz (kopf's probe endpoint), metrics at :8080/metrics.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import kopf

from cotrain_operator import handlers  # noqa: F401  (registers the handlers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cotrain-operator")
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch only these namespaces (repeatable); default: all",
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8081/healthz",
        help="kopf liveness endpoint URL, or '' to disable",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
