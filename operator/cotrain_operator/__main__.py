"""`python -m cotrain_operator`: run the operator.

Watches every namespace unless --namespace is given; liveness at
http://0.0.0.0:8081/healthz (kopf's probe endpoint), metrics at :8080/metrics.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

# kopf imports the `kubernetes` client whenever it is installed, to recognise the client's model
# objects (no handler here returns one) and to log in through it (credentials.py does that):
# 22 MiB of an idle operator's 68 (bench/README.md). A None entry makes those imports fail as
# "not installed", so the operator is the same process in its image (which has no client), in
# a development environment and in the benchmarks. It must come before kopf's import.
sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]

import kopf  # noqa: E402

from cotrain_operator import credentials, handlers  # noqa: E402  (handlers: registers them)
from cotrain_operator.settings import Settings, SettingsError  # noqa: E402


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
    try:
        settings = Settings.from_env(os.environ)
        credentials.load()
    except (SettingsError, credentials.CredentialsError, OSError) as error:
        print(f"cotrain-operator: {error}", file=sys.stderr)
        return 2
    if settings.kueue:
        handlers.watch_kueue()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo({handlers.SETTINGS_KEY: settings}),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
