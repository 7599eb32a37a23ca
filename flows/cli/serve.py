"""`ddpm serve`: the registered model's champion over HTTP, following the alias safely.

The server itself is tasks.champion_server (also run by the Prefect flow flows.serve.serve_champion);
this command runs it in this process, without Prefect: a long-lived server needs no flow run, and
its mistakes (the port taken, no store, no model, no champion, --host without a token) are one
line before it starts. Ctrl-C or SIGTERM (flows.cli.errors.stop_on_sigterm) stops it gracefully:
no new request, the admitted ones answered (within --stop-seconds), the port freed; exit status 0.
"""

from __future__ import annotations

import logging
import sys
import time

from flows.cli.errors import CLIError


def log(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)


def access_log(where: str) -> None:
    """One JSON line per request on the logger tasks.serving_http.ACCESS_LOGGER: stdout, a file, or off."""
    from tasks.serving_http import ACCESS_LOGGER

    logger = logging.getLogger(ACCESS_LOGGER)
    logger.propagate = False   # not into $DDPM_HOME/logs/ddpm.log as well
    if where == "off":
        logger.disabled = True
        return
    try:
        handler = logging.StreamHandler(sys.stdout) if where == "-" else logging.FileHandler(where)
    except OSError as error:
        raise CLIError(f"cannot write the access log {where}: {error.strerror or error}") from None
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def serve(args) -> None:
    from tasks.champion_server import ServeError, read_token, serve as serve_champion
    from tasks.serving_http import Limits

    try:
        limits = Limits(max_queue=args.max_queue, max_batch_images=args.max_batch_images,
                        draw_threads=args.draw_threads, request_seconds=args.request_seconds,
                        stop_seconds=args.stop_seconds)
        access_log(args.access_log)
        serve_champion(args.model_name, args.port, args.poll_seconds, args.check_seconds, log=log, host=args.host,
                       limits=limits, token=read_token(args.token_file), reuse_port=args.reuse_port)
    except ServeError as error:
        raise CLIError(str(error)) from None
    except KeyboardInterrupt:   # Ctrl-C, or SIGTERM: the server is closed by now
        sys.stdout.flush()
