"""The ``latentdiff`` command: parse, validate, call training or a pipeline, report.

Bad input ends in one line ``error: …`` on stderr and exit code 2, never a traceback. The commands live
in one module per group of jobs (images, training, data, viz, tools); importing them registers them. Nothing
here imports torch until a command runs, so ``latentdiff --help`` answers at once.
"""

from latentdiff.cli.app import cli, main
from latentdiff.cli import data, images, tools, training, viz  # noqa: F401,E402  (registers the commands)

__all__ = ["cli", "main"]
