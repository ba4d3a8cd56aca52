"""`optimist bench serve`: drives a running engine over gRPC with N concurrent clients (filled in below)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    del sub
