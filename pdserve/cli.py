"""`pdserve` command line: generate (offline, colocated), serve (the cluster), client and admin
(gRPC calls to a running router).

Argument errors print one line and exit with status 2; model/input errors one line and status 1.
"""

from __future__ import annotations

import argparse
import sys


class CliError(Exception):
    """A user-facing error: printed as one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        print(f"pdserve: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from pdserve import cli_client, cli_generate, cli_serve

    cli_generate.add_parser(sub)
    cli_serve.add_parsers(sub)
    cli_client.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (CliError, ValueError, FileNotFoundError) as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
