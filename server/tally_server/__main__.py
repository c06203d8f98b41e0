"""`python -m tally_server`: the same as `tally serve`."""

import argparse
import sys

from .cli import serve_command
from .config import add_arguments

# Guarded: the workers of `--workers` start by spawn, which imports this module again.
if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tally_server", description="Run the Tally gRPC server.")
    add_arguments(parser)
    sys.exit(serve_command(parser.parse_args()))
