"""User-facing errors: one clear line, exit code 2, no traceback."""
import functools
import sys


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). The message names the problem and the fix."""


EXIT_USER_ERROR = 2


def cli_main(fn):
    """Wrap a tool's ``main`` so that :class:`UserError` prints one line and exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
