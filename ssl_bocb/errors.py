"""User-facing errors: one clear line, exit code 2, no traceback."""
import functools
import signal
import sys
import threading


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). The message names the problem and the fix."""


EXIT_USER_ERROR = 2


def listen_to_interrupts() -> None:
    """SIGINT raises KeyboardInterrupt (a run saves a checkpoint and stops) even in a process started with SIGINT
    ignored, as a shell script's background jobs are: the sweep runner and SLURM stop their stages with SIGINT."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def cli_main(fn):
    """Wrap a tool's ``main`` so that :class:`UserError` prints one line and exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        listen_to_interrupts()
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
