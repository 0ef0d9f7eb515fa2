"""The `llmkern` command line: `llmkern info`, and (runtime) `llmkern generate`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llmkern", description="LLM inference kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list every op and the backends it has on this machine")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        import llmkern

        llmkern.info()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
