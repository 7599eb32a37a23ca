"""`ddpm serve`: the registered model's champion on 127.0.0.1, following the alias safely.

The server itself is tasks.champion_server (also run by the Prefect flow flows.serve.serve_champion);
this command runs it in this process, without Prefect: a long-lived server needs no flow run, and
its mistakes (the port taken, no store, no model, no champion) are one line before it starts.
Ctrl-C or SIGTERM (flows.cli.errors.stop_on_sigterm) stops it and frees the port; the exit status is 0.
"""

from __future__ import annotations

import sys
import time

from flows.cli.errors import CLIError


def log(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)


def serve(args) -> None:
    from tasks.champion_server import ServeError, serve as serve_champion

    try:
        serve_champion(args.model_name, args.port, args.poll_seconds, args.check_seconds, log=log)
    except ServeError as error:
        raise CLIError(str(error)) from None
    except KeyboardInterrupt:   # Ctrl-C, or SIGTERM: the server is closed by now
        sys.stdout.flush()
