"""``python -m kfac.ext build [--cuda|--no-cuda] [--verbose]``: compile the extension ahead of time (later
processes then load it without compiling); ``python -m kfac.ext info``: print its status as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import _loader
from .ops import info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kfac.ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile and load the extension into the cache")
    b.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                   help="include the CUDA kernels (default: when CUDA is usable here)")
    b.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    sub.add_parser("info", help="print the extension's status")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build":
        config = _loader.BuildConfig.default(cuda=args.cuda)
        try:
            library = _loader.build(config, verbose=args.verbose)
        except Exception as exc:  # noqa: BLE001 - report any failure, exit non-zero
            print(f"kfac.ext build failed: {exc}", file=sys.stderr)
            return 1
        print(f"built {library} (cuda kernels: {'yes' if config.cuda else 'no'})")
        return 0
    print(json.dumps(info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
