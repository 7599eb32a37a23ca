"""serve_champion: serve the registered model's `champion` over HTTP until the flow run is cancelled.

    python -m flows.serve                          # registered model "ddpm" on 127.0.0.1:5055
    ddpm serve --port 5056                         # the same server without Prefect (flows/cli/serve.py)

The server is tasks.champion_server: MLflow's scoring protocol on uvicorn at 127.0.0.1:<port> (another
`host` only with a token: $DDPM_SERVE_TOKEN in the work pool's env, or `token_file`), a watcher that
follows the alias, checks each new champion before it takes traffic and moves the alias back
when one fails. The flow run stays RUNNING while it serves; cancelling it (the UI, `prefect
flow-run cancel`) or stopping its process (SIGTERM, Ctrl-C) stops the server gracefully (the
requests in flight answered within `stop_seconds`) and frees the port.
A server that cannot start (the port taken, no store, no model, no champion) fails the run with
that one line.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from tasks import champion_server, contract
from tasks.serving_http import Limits

Port = Annotated[int, Field(ge=1, le=65535, description="port")]
Count = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


@flow(name="serve_champion")
def serve_champion(
    model_name: Annotated[str, Field(min_length=1, description="registered model")] = contract.DEFAULT_MODEL_NAME,
    port: Port = champion_server.DEFAULT_PORT,
    poll_seconds: Annotated[Seconds, Field(description="how often the alias is looked at")] =
        champion_server.DEFAULT_POLL_SECONDS,
    check_seconds: Annotated[Seconds, Field(description="a new champion loads and answers its check within")] =
        champion_server.DEFAULT_CHECK_SECONDS,
    host: Annotated[str, Field(min_length=1, description="address to listen on; beyond loopback needs a token")] =
        champion_server.HOST,
    token_file: Annotated[str | None, Field(description="file holding the clients' token (default: "
                                                        f"${champion_server.TOKEN_ENV})")] = None,
    max_queue: Annotated[Count, Field(description="requests in flight; past it 503 + Retry-After")] =
        Limits.max_queue,
    max_batch_images: Annotated[Count, Field(description="images drawn together in one batch")] =
        Limits.max_batch_images,
    stop_seconds: Annotated[Seconds, Field(description="at cancellation, requests in flight are answered within")] =
        Limits.stop_seconds,
) -> dict:
    """Serve models:/<model_name>@champion on <host>:<port> until cancelled; the last /version."""
    logger = get_run_logger()   # bound to this flow run: the watcher thread's lines reach its log too
    try:
        limits = Limits(max_queue=max_queue, max_batch_images=max_batch_images, stop_seconds=stop_seconds)
        return champion_server.serve(model_name, port, poll_seconds, check_seconds, log=logger.info, host=host,
                                     limits=limits, token=champion_server.read_token(token_file))
    except champion_server.ServeError as error:
        raise ValueError(str(error)) from None   # the flow run fails with the one line


if __name__ == "__main__":
    from flows.prefect_server import prefect_api

    with prefect_api():
        serve_champion()
