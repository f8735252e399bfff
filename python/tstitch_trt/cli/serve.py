"""`tstitch-trt serve`: a bundle over HTTP on Ray Serve (serve/launch.py); every pipeline kind the bundle may
be (serve/requests.py parses each kind's request). Needs the serve extra, not torch."""

from __future__ import annotations

import argparse

NAME = "serve"
HELP = "serve a bundle over HTTP on Ray Serve (needs the serve extra)"


def add_arguments(s: argparse.ArgumentParser) -> None:
    from tstitch_trt.serve.launch import add_serve_arguments

    add_serve_arguments(s)


def command(args: argparse.Namespace) -> int:
    from tstitch_trt.serve.launch import serve_forever, service_config

    return serve_forever(service_config(args), args.host, args.port)
