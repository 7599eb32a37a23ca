"""The pipeline's commands: prepare, train, compare, evaluate, promote, retrain, and the local stack.

Each takes the parsed arguments, builds its configuration (flows.cli.configs), checks what can be
checked before Prefect starts (`preflight`: seconds, not a failed flow run), runs the flow in this
process and prints its result as JSON.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from flows.cli.configs import (FLOW_OPTIONS, config_of, data_config, pipeline_arguments, pipeline_config,
                               promote_config, retrain_arguments)
from flows.cli.errors import CLIError, one_line, quiet_tracebacks

REPO = Path(__file__).resolve().parents[2]


def print_json(data) -> None:
    print(json.dumps(data, indent=1, default=str))


def lazy_flow(module: str, name: str, args=None):
    """Import flow `name` from `module` now, with a clear error if that flow is not installed.

    Unless `args.verbose`, tracebacks then go to the log file (`args.log_file`), not the terminal.
    """
    try:
        flow = getattr(importlib.import_module(module), name)
        if args is not None and not args.verbose:
            quiet_tracebacks(args.log_file)
        return flow
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        raise CLIError(f"{module}.{name} is not available in this installation ({module} is missing)") from None


def run_flow(flow, *args, **kwargs):
    """Run `flow` in this process against $PREFECT_API_URL, else a temporary server that dies with
    this process (`flows.prefect_server`)."""
    from flows.prefect_server import prefect_api
    from tasks.settings import check_reachable, tracking_uri

    # a server that is down is one line naming it, not an HTTP client's traceback minutes later
    check_reachable(tracking_uri(), "the MLflow tracking server (MLFLOW_TRACKING_URI)")
    if os.environ.get("PREFECT_API_URL"):
        check_reachable(os.environ["PREFECT_API_URL"], "the Prefect API (PREFECT_API_URL)")
    with prefect_api():
        return flow(*args, **kwargs)


def validated(flow, kwargs: dict) -> dict:
    """`kwargs` as the flow will see them, validated here as Prefect would validate them after
    starting its server: a bad value is one line in a second, not a failed flow run."""
    from prefect.exceptions import ParameterTypeError

    prefect_logger = logging.getLogger("prefect.flows")   # it would log the whole error dump first
    level = prefect_logger.level
    prefect_logger.setLevel(logging.CRITICAL)
    try:
        return flow.validate_parameters(kwargs)
    except ParameterTypeError as error:
        raise CLIError(one_line(error).removeprefix("Flow run received invalid parameters: - ")
                       .replace("Value error, ", "")) from None
    finally:
        prefect_logger.setLevel(level)


def preflight(flow, kwargs: dict, runs: int = 1) -> None:
    """The flow's parameter validation and the pipeline's checks that need no data, before
    Prefect starts (seconds, not a training); disk space for `runs` runs."""
    from flows.train_pipeline import check_config, check_disk_space

    validated(flow, kwargs)
    config = config_of(kwargs)
    check_config(config)
    check_disk_space(config, runs)


def show_config(kwargs: dict) -> None:
    """--show-config: the flow's arguments, every setting spelled out, as JSON; nothing runs."""
    from pydantic import BaseModel

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value

    print_json(plain(kwargs))


def find_script(name: str) -> Path:
    """scripts/<name> of the project this command belongs to (never the current folder's: a
    stranger's scripts/ would run with the user's rights)."""
    path = REPO / "scripts" / name
    if not path.is_file():
        raise CLIError(f"{path} not found: `ddpm {name.removesuffix('.sh')}` needs the source checkout "
                       "(pip install -e .)")
    return path


# --- the commands ------------------------------------------------------------------------------


def prepare(args) -> None:
    from ddpm.data import load_prepared, prepare_dataset
    from tasks.settings import ddpm_home

    out = Path(args.out) if args.out else ddpm_home(create=True) / "data"
    dataset = load_prepared(prepare_dataset(data_config(args), out))
    print_json({"path": str(dataset.path), "fingerprint": dataset.fingerprint, "splits": dataset.manifest["splits"]})


def resume_arguments(args) -> dict:
    """`--resume RUN`: the run continues with the configuration it started with, so any option
    that would change it is refused by name (--experiment stays: it is --promote's)."""
    from tasks.config import DEFAULTS

    # --conditional first: working out its class count would prepare the data
    changed = ["--conditional"] if args.conditional else [
        change.split()[0] for change in DEFAULTS.differences(pipeline_config(args))]
    changed += [f"--{name.replace('_', '-')}" for name in FLOW_OPTIONS
                if name != "experiment" and getattr(args, name, None) is not None]
    if changed:
        raise CLIError(f"--resume continues run {args.resume} with the configuration it was started with; "
                       f"drop the options that set {', '.join(changed)}")
    return {"resume": args.resume, **({"force_resume": True} if args.force else {})}


def train(args) -> None:
    flow = lazy_flow("flows.train_pipeline", "train_pipeline", args)
    if args.force and not args.resume:
        raise CLIError("--force declares a run dead to resume it: give the run with --resume RUN_ID")
    if args.resume:
        if args.show_config:   # the settings it resumes with: the run's own
            from tasks import tracking
            from tasks.config import PipelineConfig

            return print_json(PipelineConfig.from_stored(tracking.run_config(tracking.find_run(args.resume))).to_stored())
        kwargs = resume_arguments(args)
    else:
        kwargs = pipeline_arguments(flow, args)
        if args.show_config:
            return show_config(kwargs)
        preflight(flow, kwargs)
    result = run_flow(flow, **kwargs)
    if args.promote:
        from tasks import contract
        from tasks.registry import promote_best

        result["promotion"] = promote_best(args.experiment or contract.DEFAULT_EXPERIMENT, args.model_name,
                                           conditional=result.get("conditional"))
    print_json({k: result[k] for k in ("run_id", "checkpoints", "evaluation", "promotion") if k in result})


def compare(args) -> None:
    flow = lazy_flow("flows.compare_schedules", "compare_schedules", args)
    kwargs = pipeline_arguments(flow, args)
    defaults = {name: p.default for name, p in inspect.signature(flow.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    given = {**defaults, **kwargs}
    if args.show_config:   # with each schedule's diffusion settings, as the flow will build them
        from flows.compare_schedules import schedule_configs

        configs = schedule_configs(given["schedules"], given["num_timesteps"], config_of(given))
        return show_config({**kwargs, "diffusion": {name: c.diffusion for name, c in configs.items()}})
    preflight(flow, kwargs, runs=len(given["schedules"]))   # one run per schedule, all kept
    table = run_flow(flow, **kwargs)
    # every row and column as JSON, like the other commands (str() of a DataFrame cuts it to the terminal)
    print_json(table.to_dict(orient="records"))


def evaluate(args) -> None:
    flow = lazy_flow("flows.evaluate", "evaluate", args)
    kwargs = {"mlflow_run_id": args.run_id} if args.run_id else {"prefect_flow_run_id": args.flow_run_id}
    fid_extractor = vars(args).get(".fid_extractor")
    if fid_extractor:
        kwargs["fid_extractor"] = fid_extractor
    if args.posthoc_ema:   # otherwise the flow sweeps when the run kept snapshots
        kwargs["posthoc_ema"] = True
    kwargs |= {"posthoc_sigma_rels": args.sigma_rels, "posthoc_steps": args.posthoc_steps,
               "max_parallel": args.max_parallel, "dask_cluster": args.dask_cluster}
    print_json(run_flow(flow, **kwargs))


def promote(args) -> None:
    flow = lazy_flow("flows.promote", "promote", args)   # its failures one line, the trace in the log file
    print_json(run_flow(flow, promote_config(args)))


def retrain(args) -> None:
    flow = lazy_flow("flows.retrain", "retrain", args)
    kwargs = retrain_arguments(args)
    if args.show_config:
        return show_config(kwargs)
    validated(flow, kwargs)
    source = kwargs.get("data", {}).get("source")
    if source:   # a folder that is not there is one line now, not after Prefect and MLflow started
        from ddpm.data import source_identity
        from ddpm.data.prepare import default_download_dir
        from tasks.settings import ddpm_home

        source_identity(source, default_download_dir(ddpm_home() / "data"))
    result = run_flow(flow, **kwargs)
    print_json({k: result[k] for k in ("decision", "reason", "run_id", "based_on", "evaluation", "promotion")
                if k in result})


def stack(args) -> None:
    sys.exit(subprocess.call(["bash", str(find_script("stack.sh")), args.action]))


def deploy(args) -> None:
    sys.exit(subprocess.call(["bash", str(find_script("deploy.sh")), *args.script_args]))
