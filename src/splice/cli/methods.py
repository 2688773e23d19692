"""`splice methods`: the PEFT family table, read from the method registry."""

from __future__ import annotations

import argparse

from splice.tables import format_table
from splice.core.registry import method_table

NAME = "methods"
HELP = "list the PEFT methods splice implements"
DESCRIPTION = "The PEFT family: what each method trains and whether it merges into the base."
EPILOG = "example:\n  splice methods"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    rows = method_table()
    headers = ["method", "trains", "mergeable", "file format"]
    print(format_table(headers, [[row[h] for h in headers] for row in rows]))
    return 0
