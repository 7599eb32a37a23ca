"""serve_champion: serve the registered model's `champion` over HTTP until the flow run is cancelled.

    python -m flows.serve                          # registered model "ddpm" on 127.0.0.1:5055
    ddpm serve --port 5056                         # the same server without Prefect (flows/cli/serve.py)

The server is tasks.champion_server: MLflow's scoring protocol on 127.0.0.1:<port>, a watcher that
follows the alias, checks each new champion before it takes traffic and moves the alias back
when one fails. The flow run stays RUNNING while it serves; cancelling it (the UI, `prefect
flow-run cancel`) or stopping its process (SIGTERM, Ctrl-C) closes the server and frees the port.
A server that cannot start (the port taken, no store, no model, no champion) fails the run with
that one line.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from tasks import champion_server, contract

Port = Annotated[int, Field(ge=1, le=65535, description="port on 127.0.0.1")]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


@flow(name="serve_champion")
def serve_champion(
    model_name: Annotated[str, Field(min_length=1, description="registered model")] = contract.DEFAULT_MODEL_NAME,
    port: Port = champion_server.DEFAULT_PORT,
    poll_seconds: Annotated[Seconds, Field(description="how often the alias is looked at")] =
        champion_server.DEFAULT_POLL_SECONDS,
    check_seconds: Annotated[Seconds, Field(description="a new champion loads and answers its check within")] =
        champion_server.DEFAULT_CHECK_SECONDS,
) -> dict:
    """Serve models:/<model_name>@champion on 127.0.0.1:<port> until cancelled; the last /version."""
    logger = get_run_logger()   # bound to this flow run: the watcher thread's lines reach its log too
    try:
        return champion_server.serve(model_name, port, poll_seconds, check_seconds, log=logger.info)
    except champion_server.ServeError as error:
        raise ValueError(str(error)) from None   # the flow run fails with the one line


if __name__ == "__main__":
    from flows.prefect_server import prefect_api

    with prefect_api():
        serve_champion()
