"""The ``raptor`` command line.

Subcommands live in small modules that each provide ``add_parser(subparsers)``
(which sets ``func``) so the command line grows without one giant file:
``embed`` and ``info`` in :mod:`.embed`, ``probe`` and ``explain`` in
:mod:`.probe`, ``labels`` in :mod:`.labels`, ``batch`` and ``merge`` in :mod:`.batch`,
``models`` in :mod:`.models`; the options they share in :mod:`.options`.

Every user-facing failure prints one line ``raptor: error: ...`` and exits
non-zero; there are no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import Cancelled, RaptorError
from ..version import __version__
from . import batch, labels, models, probe, serve
from .embed import add_embed_parser, add_info_parser


class _Parser(argparse.ArgumentParser):
    """Option errors are one ``raptor: error:`` line too, like every other error (exit status 2, as argparse's)."""

    def error(self, message: str):
        command = self.prog.removeprefix("raptor").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"raptor: error: {where}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="raptor",
        description="Raptor: train-free 3D embeddings of CT/MR volumes with a frozen 2D foundation model.",
    )
    parser.add_argument("--version", action="version", version=f"raptor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_embed_parser(sub)
    add_info_parser(sub)
    for module in (probe, labels, batch, models, serve):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Cancelled:
        print("raptor: cancelled; nothing partial was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("raptor: interrupted; finished outputs are kept, nothing partial was written", file=sys.stderr)
        return 130
    except RaptorError as exc:
        print(f"raptor: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `raptor probe apply ... | head`: the reader left, nothing to say
        return 1
    except OSError as exc:  # a read or write no command wrapped: still one line, naming the file
        print(f"raptor: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except MemoryError:
        print("raptor: error: out of memory (a smaller --grid or --batch-size, or fewer --readers, needs less)",
              file=sys.stderr)
        return 1


def os_error_line(exc: OSError) -> str:
    """``<path>: <reason>`` for an error from the operating system."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename2 if exc.filename2 is not None else exc.filename
    return f"{where}: {reason}" if where is not None else reason


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
