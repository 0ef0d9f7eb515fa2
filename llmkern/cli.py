"""The `llmkern` command line: `llmkern info` and `llmkern generate "prompt"`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from .models import cli_generate  # imports only argparse/sys at module level: cheap

    parser = argparse.ArgumentParser(prog="llmkern", description="LLM inference kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list every op and the backends it has on this machine")
    cli_generate.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        import llmkern

        llmkern.info()
        return 0
    if args.command == "generate":
        return cli_generate.run(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
