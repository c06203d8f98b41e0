"""`python -m tally_server`: the same as `tally serve`."""

import argparse

from .app import run
from .config import add_arguments, from_arguments

parser = argparse.ArgumentParser(prog="python -m tally_server", description="Run the Tally gRPC server.")
add_arguments(parser)
run(from_arguments(parser.parse_args()))
