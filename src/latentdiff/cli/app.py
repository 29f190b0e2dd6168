"""The ``latentdiff`` command group and its entry point: user errors print one line and exit with code 2."""

from __future__ import annotations

import os
import sys
import traceback
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
    except BrokenPipeError:  # `latentdiff presets | head -1`: the reader left; nothing more to say
        # Python flushes stdout at exit and would complain about the closed pipe (the recipe of its docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except Exception as e:  # noqa: BLE001 -- the last resort: a bug, reported as one line, not a crash dump
        last_resort(e)


DEBUG_VARIABLE = "LATENTDIFF_DEBUG"
LAST_RESORT = f"run with {DEBUG_VARIABLE}=1 for the traceback"  # the bad-input suite fails if it sees this


def last_resort(e: Exception) -> None:
    """An exception no check foresaw: one line (and the traceback when LATENTDIFF_DEBUG is set), exit code 1.

    Bad input must be caught earlier, as a UserError naming what is wrong; reaching this is a bug to report.
    """
    if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        traceback.print_exception(e)
    text = " ".join(str(e).split())[:300] or "no message"
    click.echo(f"error: unexpected {type(e).__name__}: {text} (a bug in latentdiff: please report it; "
               f"{LAST_RESORT})", err=True)
    sys.exit(1)
