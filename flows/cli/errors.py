"""The command line's error policy: a mistake the user can fix is one line on stderr and exit 1;
tracebacks go to $DDPM_HOME/logs/ddpm.log unless --verbose. Argument mistakes are argparse's (exit 2).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path


class CLIError(Exception):
    """A mistake the user can fix; printed as one line, exit status 1."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a command may raise that is the user's to fix, printed as one line: a missing file, a
    read-only folder, a full disk (OSError names the path), an unknown run or model (LookupError,
    MlflowException), a bad value (ValueError, pydantic's included), an extra not installed, a
    checkpoint that does not fit, a failed training process."""
    from tasks.settings import MissingExtraError

    expected: tuple[type[BaseException], ...] = (CLIError, OSError, LookupError, ValueError, FloatingPointError,
                                                 MissingExtraError)
    try:
        from mlflow.exceptions import MlflowException

        from ddpm.checkpoint import CheckpointError
        from ddpm.metrics.extractors import InceptionUnavailable
        from ddpm.torchrun import TrainingProcessError

        expected += (MlflowException, CheckpointError, InceptionUnavailable, TrainingProcessError)
    except ImportError:
        pass
    return expected


def one_line(error: BaseException) -> str:
    """A readable single line for an expected error (ddpm.errors.one_line, imported only on an error)."""
    from ddpm.errors import one_line as format_error

    return format_error(error)


class WithoutTraceback(logging.Formatter):
    """Formats a record as `inner` does, minus its traceback and, for a warning or an error, all
    but the first line of its message: on the terminal a failing flow prints one line naming the
    problem, not Prefect's 30-180 lines of frames, nor the SQL and parameters of a database error
    (the log file keeps the root logger's records whole). Information (a flow's printed summary)
    stays whole."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info or record.exc_text or record.stack_info or (
                record.levelno >= logging.WARNING and "\n" in message):
            record = logging.makeLogRecord({**record.__dict__, "msg": message.split("\n", 1)[0], "args": None,
                                            "exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(record)


def _stream_handlers():
    """The handlers writing to a terminal stream, on the root logger and on the libraries' own
    loggers (MLflow's "mlflow" logger has its own, and does not propagate)."""
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    return [handler for logger in loggers for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]


def quiet_tracebacks(log_file: Path) -> None:
    """Tracebacks off the terminal and into `log_file` (every record at INFO and above, in full).

    Prefect (imported by the flow commands) installs its console handler on the root logger,
    MLflow its own on the "mlflow" logger: both are quietened (call this after importing them).
    The Prefect UI still gets full tracebacks through its own API handler.
    """
    # a handler that cannot write (the log file on a full disk) drops its record instead of
    # printing "--- Logging error ---" and a traceback for each, thousands of lines on a full disk
    logging.raiseExceptions = False
    # MLflow's store logs each database error it then raises ("SQLAlchemy database error. The
    # following exception is caught."): the raised error is reported, once (and --verbose keeps it)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    root = logging.getLogger()
    for handler in _stream_handlers():
        if not isinstance(handler.formatter, WithoutTraceback):
            handler.setFormatter(WithoutTraceback(handler.formatter))
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
    except OSError:   # a full or read-only disk: the command still runs, its errors still one line
        return
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)


def stop_on_sigterm() -> None:
    """SIGTERM (systemd, `kill`, a scheduler) ends the command as Ctrl-C does: the MLflow run is
    marked KILLED and the temporary Prefect server is stopped. Python's default would die at once,
    with the run still RUNNING."""
    from ddpm.stop import STOP_REQUESTED

    def interrupt(signum, frame):
        STOP_REQUESTED.set()   # seen by the training loop even if this raise lands somewhere that swallows it
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
