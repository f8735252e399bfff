"""`tstitch-trt build | run | info | check | bench | serve`: one module per command.

Each command module (cli/<name>.py) has NAME, HELP, add_arguments(parser) and command(args) -> exit
code; the command picks the code path of the pipeline kind it is given (DiT, SD / SDXL with their
ControlNet and LCM variants). This module only wires them: the parser, and the error contract of
cli/common.py around the chosen command. Command modules never import this one (no import circle).
"""

from __future__ import annotations

import argparse

from tstitch_trt import __version__
from tstitch_trt.cli import bench, build, check, info, run, serve
from tstitch_trt.cli.common import Help, Parser, run_guarded

COMMANDS = (build, run, info, check, bench, serve)  # the order of `tstitch-trt --help`


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tstitch-trt", formatter_class=Help,
               description="T-Stitch diffusion sampling on TensorRT / ONNX Runtime step engines")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    for cmd in COMMANDS:
        cmd.add_arguments(sub.add_parser(cmd.NAME, help=cmd.HELP, description=cmd.HELP, formatter_class=Help))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help / --version (0) or a usage error (2, already printed on one line)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    return run_guarded({cmd.NAME: cmd.command for cmd in COMMANDS}[args.command], args)


__all__ = ["COMMANDS", "build_parser", "main"]
