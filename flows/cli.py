"""`ddpm`: the pipeline from a terminal. `ddpm --help`, `ddpm <command> --help`.

    ddpm prepare --source digits                       prepare (and fingerprint) a dataset
    ddpm train --steps 2000 --schedule cosine          the training pipeline (one MLflow run)
    ddpm train --recipe mnist --source mnist:DIR       MNIST at full size, official split, Inception FID
    ddpm train --resume <mlflow run id>                continue a crashed or killed training run
    ddpm train --conditional                           class-conditional, classifier-free guidance
    ddpm compare --schedules linear cosine             one pipeline per noise schedule
    ddpm evaluate --run-id <mlflow run id>             FID of a run's checkpoints
    ddpm promote                                       best run by FID -> registry, champion alias
    ddpm sample --model models:/ddpm@champion --out samples/
    ddpm sample --checkpoint step-0001500.pt --class 3 --guidance 3
    ddpm interpolate --checkpoint step-0001500.pt --a 0 --b 1
    ddpm denoise --checkpoint step-0001500.pt --indices 0 1 2 3 --t 100 500
    ddpm stack start|stop|status                       the local Prefect + MLflow stack
    ddpm deploy                                        register the flows' deployments

Mistakes in the arguments exit with 2 (argparse); a missing file, an unknown model URI or a
value out of range prints one line on stderr and exits with 1. Heavy imports (torch, Prefect,
MLflow) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class CLIError(Exception):
    """A mistake the user can fix; printed as one line, exit status 1."""


# --- helpers --------------------------------------------------------------------------------


def lazy_flow(module: str, name: str, args=None):
    """Import flow `name` from `module` now, with a clear error if that flow is not installed.

    Unless `args.verbose`, tracebacks then go to the log file (`args.log_file`), not the terminal.
    """
    import importlib

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

    with prefect_api():
        return flow(*args, **kwargs)


def parse_setting(text: str) -> tuple[str, str, object]:
    """'train.learning_rate=1e-3' -> ('train', 'learning_rate', 0.001); values are JSON when they parse."""
    key, sep, raw = text.partition("=")
    section, dot, field = key.partition(".")
    if not sep or not dot or not field:
        raise argparse.ArgumentTypeError(f"expected SECTION.FIELD=VALUE (e.g. train.learning_rate=1e-3; the FID "
                                         f"extractor is --fid-extractor), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return section, field, value


def update_config(config, changes: dict):
    """A copy of a frozen pydantic config with `changes` applied and validated."""
    return type(config).model_validate({**config.model_dump(), **changes})


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def one_of(*names: str):
    """An argparse type accepting only `names` (a usage error, exit 2, otherwise)."""
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(names)})")
        return text
    return parse


# The pipeline options: each sets one PipelineConfig setting (tasks.config, the one home of their
# defaults; `--show-config` prints them), as `--set KEY=VALUE` would.   flag: (setting, type, help)
PIPELINE_OPTIONS = {
    "--source": ("data.source", str, "data source: digits, mnist[:DIR], cifar10[:PATH], folder:DIR"),
    "--max-images": ("data.max_images", positive_int, "use a random subset of this many images"),
    "--image-size": ("data.image_size", positive_int, "side of the square images"),
    "--schedule": ("diffusion.schedule", str, "noise schedule: linear, cosine, sigmoid, ..."),
    "--steps": ("train.steps", positive_int, "optimizer steps"),
    "--batch-size": ("train.batch_size", positive_int, "images per optimizer step"),
    "--lr": ("train.learning_rate", float, "learning rate"),
    "--processes": ("train.num_processes", positive_int,
                    "data-parallel training processes (torchrun; one GPU or CPU core each); several nodes: "
                    "--set train.nnodes=N --set train.rdzv_endpoint=HOST:PORT"),
    "--num-samples": ("sampling.num_images", positive_int, "images sampled for the FID"),
    "--sample-steps": ("sampling.num_steps", positive_int, "sampler steps for the FID samples"),
    "--fid-extractor": ("fid_extractor", one_of("auto", "classifier", "inception"), "auto, classifier or inception"),
}


def option_dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


# Options of the flows besides the pipeline's configuration.
FLOW_OPTIONS = ("experiment", "run_name", "schedules", "num_timesteps", "max_parallel", "dask_cluster")


def pipeline_config(args):
    """The PipelineConfig the command line asks for: the recipe (default: the defaults), then the
    preset, the options and every --set, validated once (a bad value is one line naming the setting)."""
    from ddpm.unet import preset
    from tasks.config import recipe

    config = recipe(args.recipe or "digits")
    if args.preset:   # a conditional recipe stays conditional
        config = config.model_copy(update={"model": preset(args.preset, num_classes=config.model.num_classes)})
    settings = {key: getattr(args, option_dest(flag)) for flag, (key, _, _) in PIPELINE_OPTIONS.items()
                if getattr(args, option_dest(flag), None) is not None}
    settings.update({f"{section}.{field}": value for section, field, value in args.set or []})
    if getattr(args, "conditional", False) and "model.num_classes" not in settings:
        data = config.with_settings({k: v for k, v in settings.items() if k.startswith("data.")}).data
        settings["model.num_classes"] = data_class_count(data)
    return config.with_settings(settings)


def pipeline_arguments(flow, args) -> dict:
    """The flow's keyword arguments: the sections of `pipeline_config(args)` the flow takes, and
    the flow's other options given on the command line."""
    from tasks.config import DEFAULTS

    config = pipeline_config(args)
    parameters = inspect.signature(flow.fn).parameters
    kwargs = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if name in parameters:
            kwargs[name] = value
        elif value != getattr(DEFAULTS, name):
            raise CLIError(f"{flow.name} sets the {name} settings itself (compare_schedules: from --schedules and "
                           "--num-timesteps)")
    for name in FLOW_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            if name not in parameters:
                raise CLIError(f"{flow.name} does not take --{name.replace('_', '-')}")
            kwargs[name] = value
    return kwargs


def data_class_count(data) -> int:
    """How many classes the data of DataConfig `data` has: prepared here (or found prepared; the
    pipeline then reuses it), so that `--conditional` needs no number from the user."""
    from ddpm.data import load_prepared, prepare_dataset
    from tasks.settings import ddpm_home

    manifest = load_prepared(prepare_dataset(data, ddpm_home(create=True) / "data")).manifest
    if not manifest["has_labels"]:
        raise CLIError(f"--conditional needs labelled data and {data.source!r} has no labels (a folder source has "
                       "them when its images sit in one sub-folder per class)")
    return len(manifest["class_names"])


class WithoutTraceback(logging.Formatter):
    """Formats a record as `inner` does, minus its traceback: on the terminal a failing flow
    prints one line naming the problem, not Prefect's 30-180 lines of frames before it."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                            "stack_info": None})
        return self.inner.format(record)


def quiet_tracebacks(log_file: Path) -> None:
    """Tracebacks off the terminal and into `log_file` (every record at INFO and above, in full).

    Prefect (imported by the flow commands) installs its console handler on the root logger;
    the Prefect UI still gets full tracebacks through its own API handler.
    """
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setFormatter(WithoutTraceback(handler.formatter))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_file)
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)


def find_script(name: str) -> Path:
    """scripts/<name> of the project this command belongs to (never the current folder's: a
    stranger's scripts/ would run with the user's rights)."""
    path = REPO / "scripts" / name
    if not path.is_file():
        raise CLIError(f"{path} not found: `ddpm {name.removesuffix('.sh')}` needs the source checkout "
                       "(pip install -e .)")
    return path


def print_json(data) -> None:
    print(json.dumps(data, indent=1, default=str))


def sampler_config(args, num_images: int = 1):
    from ddpm.samplers import SamplerConfig

    class_label, guidance = getattr(args, "class_label", None), getattr(args, "guidance", None)
    given = {"sampler": args.sampler, "num_steps": args.steps, "eta": args.eta}
    return SamplerConfig(**{k: v for k, v in given.items() if v is not None}, num_images=num_images,
                         seed=args.seed, batch_size=min(num_images, args.batch_size),
                         classes=None if class_label is None else (class_label,), guidance_scale=guidance)


# --- commands -------------------------------------------------------------------------------


def cmd_prepare(args) -> None:
    from ddpm.data import load_prepared, prepare_dataset
    from tasks.config import recipe
    from tasks.settings import ddpm_home

    base = recipe(args.recipe or "digits").data
    options = {"source": args.source, "image_size": args.image_size, "channels": args.channels,
               "max_images": args.max_images, "split": args.split, "resize": args.resize}
    config = update_config(base, {k: v for k, v in options.items() if v is not None})
    out = Path(args.out) if args.out else ddpm_home(create=True) / "data"
    dataset = load_prepared(prepare_dataset(config, out))
    print_json({"path": str(dataset.path), "fingerprint": dataset.fingerprint, "splits": dataset.manifest["splits"]})


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
        raise CLIError(one_line(error).removeprefix("Flow run received invalid parameters: - ")) from None
    finally:
        prefect_logger.setLevel(level)


def preflight(flow, kwargs: dict) -> None:
    """The flow's parameter validation and the pipeline's checks that need no data, before
    Prefect starts (seconds, not a training)."""
    from flows.train_pipeline import check_config

    validated(flow, kwargs)
    check_config(config_of(kwargs))


def config_of(arguments: dict):
    """The PipelineConfig of a flow's arguments (the sections it does not take: the defaults)."""
    from tasks.config import PipelineConfig

    return PipelineConfig(**{k: v for k, v in arguments.items() if k in PipelineConfig.model_fields})


def show_config(kwargs: dict) -> None:
    """--show-config: the flow's arguments, every setting spelled out, as JSON; nothing runs."""
    from pydantic import BaseModel

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value

    print_json(plain(kwargs))


def flow_defaults(flow) -> dict:
    return {name: p.default for name, p in inspect.signature(flow.fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def cmd_train(args) -> None:
    flow = lazy_flow("flows.train_pipeline", "train_pipeline", args)
    if args.resume:
        from tasks.config import DEFAULTS

        if args.show_config:   # the settings it resumes with: the run's own
            from tasks import tracking
            from tasks.config import PipelineConfig

            return print_json(PipelineConfig.from_stored(tracking.run_config(tracking.find_run(args.resume))).to_stored())
        # --conditional first: working out its class count would prepare the data
        changed = ["--conditional"] if args.conditional else [
            change.split()[0] for change in DEFAULTS.differences(pipeline_config(args))]
        changed += [
            f"--{name.replace('_', '-')}" for name in FLOW_OPTIONS if name != "experiment"   # experiment: for --promote
            and getattr(args, name, None) is not None]
        if changed:
            raise CLIError(f"--resume continues run {args.resume} with the configuration it was started with; "
                           f"drop the options that set {', '.join(changed)}")
        kwargs = {"resume": args.resume}
    else:
        kwargs = pipeline_arguments(flow, args)
        if args.show_config:
            return show_config(kwargs)
        preflight(flow, kwargs)
    result = run_flow(flow, **kwargs)
    if args.promote:
        from tasks.registry import promote_best

        result["promotion"] = promote_best(args.experiment or "ddpm", args.model_name,
                                           conditional=result.get("conditional"))
    print_json({k: result[k] for k in ("run_id", "checkpoints", "evaluation", "promotion") if k in result})


def cmd_compare(args) -> None:
    flow = lazy_flow("flows.compare_schedules", "compare_schedules", args)
    kwargs = pipeline_arguments(flow, args)
    if args.show_config:   # with each schedule's diffusion settings, as the flow will build them
        from flows.compare_schedules import schedule_configs

        given = {**flow_defaults(flow), **kwargs}
        configs = schedule_configs(given["schedules"], given["num_timesteps"], config_of(given))
        return show_config({**kwargs, "diffusion": {name: c.diffusion for name, c in configs.items()}})
    preflight(flow, kwargs)
    print_json(run_flow(flow, **kwargs))


def cmd_evaluate(args) -> None:
    flow = lazy_flow("flows.evaluate", "evaluate", args)
    kwargs = {"mlflow_run_id": args.run_id} if args.run_id else {"prefect_flow_run_id": args.flow_run_id}
    if args.fid_extractor:
        kwargs["fid_extractor"] = args.fid_extractor
    print_json(run_flow(flow, **kwargs))


def cmd_promote(args) -> None:
    from flows.promote import PromoteConfig, promote

    config = PromoteConfig(experiments=args.experiment or ["ddpm"], model_name=args.model_name,
                           fingerprint=args.fingerprint, metric=args.metric, max_images=args.max_images,
                           conditional=args.conditional)
    print_json(run_flow(promote, config))


def cmd_sample(args) -> None:
    from ddpm.sampling import write_images
    from tasks.experiments import sample_images

    source = args.model or args.checkpoint
    if args.model and not args.model.startswith("models:/"):
        raise CLIError(f"--model takes a models:/<name>@<alias> or models:/<name>/<version> URI, got {args.model!r}")
    images = sample_images(source, sampler_config(args, args.num_images))
    print_json(write_images(images, args.out))


def cmd_interpolate(args) -> None:
    from tasks.experiments import interpolation_grid, real_images

    require_file(args.checkpoint)
    x0 = real_images(args.dataset, [args.a, args.b], args.split)
    print_json(interpolation_grid(args.checkpoint, x0[0], x0[1], args.t, args.num, sampler_config(args),
                                  args.out, args.run_id))


def cmd_denoise(args) -> None:
    from tasks.experiments import denoising_grid, real_images

    require_file(args.checkpoint)
    x0 = real_images(args.dataset, args.indices, args.split)
    print_json(denoising_grid(args.checkpoint, x0, args.t, sampler_config(args), args.out, args.run_id))


def cmd_stack(args) -> None:
    sys.exit(subprocess.call(["bash", str(find_script("stack.sh")), args.action]))


def cmd_deploy(args) -> None:
    sys.exit(subprocess.call(["bash", str(find_script("deploy.sh")), *args.script_args]))


def require_file(path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")


# --- the parser -----------------------------------------------------------------------------


# The names of tasks.config.RECIPES, spelled out so that building the parser imports no
# torch; tests/test_cli.py checks that the two agree.
RECIPE_NAMES = ("digits", "mnist", "digits-conditional")


def add_pipeline_options(parser: argparse.ArgumentParser, schedule_option: bool) -> None:
    group = parser.add_argument_group("the pipeline's settings (tasks.config.PipelineConfig; --show-config prints "
                                      "them all, with what these options changed)")
    group.add_argument("--recipe", choices=RECIPE_NAMES,
                       help="start from a named recipe (mnist: full size, official split, 32x32); options override it")
    group.add_argument("--preset", help="UNet preset: tiny-16, small-16, tiny-32, article-32, ddpm-cifar10")
    group.add_argument("--conditional", action="store_true",
                       help="a class-conditional model (as many classes as the data has) with classifier-free "
                            "guidance; its run adds the guidance sweep")
    for flag, (key, type_, help_) in PIPELINE_OPTIONS.items():
        if key.startswith("diffusion.") and not schedule_option:
            continue
        group.add_argument(flag, type=type_, help=f"{help_} (sets {key})")
    group.add_argument("--set", action="append", type=parse_setting, metavar="SECTION.FIELD=VALUE",
                       help="any other setting, e.g. --set train.ema_decay=0.995 --set model.dropout=0 "
                            "(sections: data, model, diffusion, train, sampling); repeatable")
    group.add_argument("--show-config", action="store_true",
                       help="print the settings this command would run with, as JSON, and stop")
    parser.add_argument("--experiment", help="MLflow experiment")


SAMPLER_NAMES = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "unipc", "heun")   # ddpm.samplers.SAMPLERS


def add_sampler_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampler")
    # No defaults here: an option left out keeps SamplerConfig's (ddpm.samplers), its one home.
    group.add_argument("--sampler", choices=SAMPLER_NAMES,
                       help="ddpm, ddim, or a few-step solver: dpm++2m, dpm++2m-sde, unipc, heun (default: "
                            "SamplerConfig's, the measured pick of docs/benchmarks.md)")
    group.add_argument("--steps", type=positive_int,
                       help="sampling steps (default: the sampler's own; all T for ddpm, 50 for ddim, 20 for the "
                            "solvers)")
    group.add_argument("--eta", type=float, help="noise scale of ddim and dpm++2m-sde, 0 = deterministic (default: SamplerConfig's)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--batch-size", type=positive_int, default=64)


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (step-XXXXXXX.pt)")
    parser.add_argument("--dataset", default="digits",
                        help="a prepared dataset folder, or a data source to prepare (default digits)")
    parser.add_argument("--split", choices=["holdout", "train"], default="holdout",
                        help="which split the indices point into")
    parser.add_argument("--run-id", help="also log the grid to this MLflow run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="DDPM pipeline: train, compare, promote, sample.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("prepare", help="prepare a dataset and print its folder and fingerprint")
    p.add_argument("--recipe", choices=RECIPE_NAMES, help="start from a recipe's data settings")
    p.add_argument("--source", help="digits (default), mnist[:DIR], cifar10[:PATH], folder:DIR")
    p.add_argument("--image-size", type=positive_int, help="side of the square images (default 16)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="1 gray (default) or 3 RGB")
    p.add_argument("--resize", choices=["center_crop", "resize", "pad", "none"],
                   help="how images are fitted to the size (default center_crop; pad: black border, no resampling)")
    p.add_argument("--split", choices=["random", "official"],
                   help="random (default): a seeded holdout; official: the source's train/test files")
    p.add_argument("--max-images", type=positive_int)
    p.add_argument("--out", help="parent folder (default $DDPM_HOME/data)")
    p.set_defaults(handler=cmd_prepare)

    p = commands.add_parser("train", help="run the training pipeline (prepare, train, sample, FID)")
    add_pipeline_options(p, schedule_option=True)
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="continue an unfinished (crashed or killed) run from its newest valid checkpoint, "
                        "in the same MLflow run, with the configuration it was started with")
    p.add_argument("--promote", action="store_true", help="promote the best run afterwards")
    p.add_argument("--model-name", default="ddpm", help="registered model for --promote")
    p.set_defaults(handler=cmd_train)

    p = commands.add_parser("compare", help="train one pipeline per noise schedule and compare FIDs")
    add_pipeline_options(p, schedule_option=False)
    p.add_argument("--schedules", nargs="+", help="noise schedules to compare")
    p.add_argument("--num-timesteps", type=positive_int, help="T for every schedule")
    p.add_argument("--max-parallel", type=positive_int, help="pipelines training at once")
    p.add_argument("--dask-cluster", metavar="local|tcp://HOST:PORT",
                   help="run the pipelines on Dask: a temporary local cluster of --max-parallel processes, or "
                        "that scheduler (needs the dask extra)")
    p.set_defaults(handler=cmd_compare)

    p = commands.add_parser("evaluate", help="FID of a finished training run's checkpoints")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="MLflow run id")
    which.add_argument("--flow-run-id", help="Prefect flow-run id of the training")
    p.add_argument("--fid-extractor", choices=["auto", "classifier", "inception"])
    p.set_defaults(handler=cmd_evaluate)

    p = commands.add_parser("promote", help="register the best run by FID; move 'champion' if it wins")
    p.add_argument("--experiment", action="append", help="MLflow experiment to search (repeatable; default ddpm)")
    p.add_argument("--model-name", default="ddpm", help="registered model name (default ddpm)")
    p.add_argument("--fingerprint", help="dataset fingerprint (default: the newest run's)")
    p.add_argument("--metric", help="fid_classifier or fid_inception (default: the newest run's)")
    p.add_argument("--max-images", type=positive_int, default=64, help="largest request the served model accepts")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--conditional", action="store_const", const=True,
                      help="promote class-conditional models (default: the kind of the newest run)")
    kind.add_argument("--unconditional", dest="conditional", action="store_const", const=False,
                      help="promote unconditional models")
    p.set_defaults(handler=cmd_promote)

    p = commands.add_parser("sample", help="images from a checkpoint or a registered model -> PNGs + grid.png")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint file (step-XXXXXXX.pt)")
    source.add_argument("--model", help="registered model URI, e.g. models:/ddpm@champion")
    p.add_argument("--num-images", type=positive_int, default=16)
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    add_sampler_options(p)
    guided = p.add_argument_group("class-conditional models")
    guided.add_argument("--class", dest="class_label", type=int, metavar="K",
                        help="draw class K (default: every class in turn)")
    guided.add_argument("--guidance", type=float, metavar="W",
                        help="classifier-free guidance scale: 0 unconditional, 1 conditional, >1 guided "
                             "(default: SamplerConfig's)")
    p.set_defaults(handler=cmd_sample)

    p = commands.add_parser("interpolate", help="interpolate two real images through the diffused latent")
    add_dataset_options(p)
    p.add_argument("--a", type=int, default=0, help="index of the first image")
    p.add_argument("--b", type=int, default=1, help="index of the second image")
    p.add_argument("--t", type=int, default=500, help="diffusion step of the latent")
    p.add_argument("--num", type=positive_int, default=8, help="number of lambdas from 0 to 1")
    p.add_argument("--out", default="interpolation.png")
    add_sampler_options(p)
    p.set_defaults(handler=cmd_interpolate)

    p = commands.add_parser("denoise", help="noise real images to x_t and reconstruct them")
    add_dataset_options(p)
    p.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7])
    p.add_argument("--t", type=int, nargs="+", default=[100, 250, 500, 750], help="diffusion steps")
    p.add_argument("--out", default="denoising.png")
    add_sampler_options(p)
    p.set_defaults(handler=cmd_denoise)

    p = commands.add_parser("stack", help="start, stop or check the local Prefect server, worker and MLflow UI")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(handler=cmd_stack)

    p = commands.add_parser("deploy", help="register the flows' Prefect deployments (scripts/deploy.sh)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="passed on to scripts/deploy.sh")
    p.set_defaults(handler=cmd_deploy)
    for command in commands.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="show full tracebacks (otherwise a failing flow's go to $DDPM_HOME/logs/ddpm.log)")
    return parser


def one_line(error: BaseException) -> str:
    """A readable single line for an expected error (pydantic errors listed as field: message)."""
    errors = getattr(error, "errors", None)
    if callable(errors) and type(error).__name__ == "ValidationError":
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in errors())
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return " ".join(str(message).split())


def stop_on_sigterm() -> None:
    """SIGTERM (systemd, `kill`, a scheduler) ends the command as Ctrl-C does: the MLflow run is
    marked KILLED and the temporary Prefect server is stopped. Python's default would die at once,
    with the run still RUNNING."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop_on_sigterm()
    from tasks.settings import MissingExtraError, ddpm_home

    args.log_file = ddpm_home() / "logs" / "ddpm.log"
    # OSError: a missing file, a read-only folder, a full disk (the message names the path)
    # MissingExtraError: an optional extra that is not installed (the message says which)
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
    logged_before = args.log_file.stat().st_size if args.log_file.is_file() else 0
    try:
        args.handler(args)
    except expected as error:
        logged = args.log_file.is_file() and args.log_file.stat().st_size > logged_before
        hint = f" (full trace: {args.log_file}, or rerun with --verbose)" if logged and not args.verbose else ""
        print(f"ddpm {args.command}: error: {one_line(error)}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
