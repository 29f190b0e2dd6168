"""The ``latentdiff`` command group and its entry point: user errors print one line and exit with code 2."""

from __future__ import annotations

import sys
import warnings

import click

from latentdiff.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="latentdiff")
def cli() -> None:
    """latentdiff: train and run latent diffusion models (the Stable Diffusion family)."""


def main() -> None:
    """Entry point: run the CLI; user errors print one line and exit with code 2."""
    # warnings of the library (a prompt truncated, a mask resized) read as one line, like errors
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # a bad option value, unknown option or command: one line too
        see = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        click.echo(f"error: {e.format_message()}{see}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; the last checkpoint is intact (use --resume)", err=True)
        sys.exit(130)
