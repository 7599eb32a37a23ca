"""The command line: one argparse parser per command, its options generated from the config classes.

An option that sets a configuration field is generated from that field (`field_options`): its
type, its choices (a Literal's values: the samplers, the extractors, the resize modes ...), its
default (the config's, shown in --help) and its help (the field's description) are the config's,
written nowhere else. Its value lands under the field's dotted key (`args.__dict__["data.source"]`),
which flows.cli.configs turns into the config objects. Only a command's own options import its
config classes (torch, ~2-4 s), so `ddpm --help` and `ddpm stack` stay instant.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_setting(text: str) -> tuple[str, Any]:
    """'train.learning_rate=1e-3' -> ('train.learning_rate', 0.001); values are JSON when they parse."""
    key, sep, raw = text.partition("=")
    section, dot, field = key.partition(".")
    if not sep or not dot or not field:
        raise argparse.ArgumentTypeError(f"expected SECTION.FIELD=VALUE (e.g. train.learning_rate=1e-3; the FID "
                                         f"extractor is --fid-extractor), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


# --- options generated from config fields -------------------------------------------------------


def _without_none(annotation):
    """The annotation of `X | None` -> X (and whether None was allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _argument_kind(field) -> dict:
    """argparse's type / choices / action for a pydantic field."""
    annotation, _ = _without_none(field.annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return {"choices": list(typing.get_args(annotation))}
    if origin is list:
        return {"action": "append"}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation is int:
        at_least_one = any((getattr(m, "ge", None) or 0) >= 1 or (getattr(m, "gt", None) or -1) >= 0
                           for m in field.metadata)
        return {"type": positive_int if at_least_one else int}
    if annotation in (float, str):
        return {"type": annotation}
    raise TypeError(f"no command-line form for a field of type {field.annotation}")


def _shown(value) -> str:
    return "None" if value is None else json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def field_options(group, model: type[BaseModel], prefix: str, flags: dict[str, str],
                  defaults: BaseModel | None = None, helps: dict[str, str] | None = None,
                  name_setting: bool = False) -> None:
    """One option per `field: flag` of `model`, its value under `prefix.field` (None when not
    given: the config keeps its own). Help: `helps[field]`, else the field's description, then
    (with `name_setting`) the setting it sets, and the default of `defaults` (the pipeline's, a
    recipe's) or of the class."""
    for name, flag in flags.items():
        field = model.model_fields[name]
        default = getattr(defaults, name) if defaults is not None else field.default
        text = (helps or {}).get(name) or field.description or name.replace("_", " ")
        sets = f"sets {prefix}.{name}" if name_setting else ""
        shown = "" if "default" in text else f"default: {_shown(default)}"   # the description says it
        kind = _argument_kind(field)
        metavar = {} if "choices" in kind or kind.get("action") not in (None, "append") else {
            "metavar": flag.removeprefix("--").replace("-", "_").upper()}
        note = "; ".join(part for part in (sets, shown) if part)
        group.add_argument(flag, dest=f"{prefix}.{name}", default=None, **kind, **metavar,
                           help=(f"{text} ({note})" if note else text).replace("%", "%%"))


def given_settings(args: argparse.Namespace, prefix: str | None = None) -> dict[str, Any]:
    """The settings the command line gave, by dotted key (`{"train.steps": 12, "fid_extractor": ...}`;
    a top-level setting's option stores under ".name"), those of `prefix.` only if given."""
    return {key.lstrip("."): value for key, value in vars(args).items()
            if "." in key and value is not None and (prefix is None or key.startswith(f"{prefix}."))}


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show full tracebacks (otherwise a failing flow's go to $DDPM_HOME/logs/ddpm.log)")


# --- each command's options -------------------------------------------------------------------------

# The pipeline's shortcut options: each sets one PipelineConfig setting (tasks.config, the one home
# of their defaults; `--show-config` prints them all), as `--set KEY=VALUE` would.
PIPELINE_OPTIONS = {
    "data.source": ("--source", None),
    "data.max_images": ("--max-images", "use a random subset of this many images"),
    "data.image_size": ("--image-size", "side of the square images"),
    "diffusion.schedule": ("--schedule", "noise schedule: linear, cosine, sigmoid, ..."),
    "train.steps": ("--steps", "optimizer steps"),
    "train.batch_size": ("--batch-size", "images per optimizer step"),
    "train.learning_rate": ("--lr", "learning rate"),
    "train.num_processes": ("--processes", "data-parallel training processes (torchrun; one GPU or CPU core each); "
                                           "several nodes: --set train.nnodes=N --set train.rdzv_endpoint=HOST:PORT"),
    "sampling.num_images": ("--num-samples", "images sampled for the FID"),
    "sampling.num_steps": ("--sample-steps", "sampler steps for the FID samples"),
    "fid_extractor": ("--fid-extractor", "FID features"),
    "rank_by": ("--rank-by", "the measure the run ranks by (its primary metric: what promotion, retrain and "
                             "compare compare)"),
}


def pipeline_options(parser: argparse.ArgumentParser, schedule_option: bool) -> None:
    from ddpm.unet import PRESETS
    from tasks import contract
    from tasks.config import DEFAULTS, RECIPES, PipelineConfig

    group = parser.add_argument_group("the pipeline's settings (tasks.config.PipelineConfig; --show-config prints "
                                      "them all, with what these options changed)")
    group.add_argument("--recipe", choices=list(RECIPES),
                       help="start from a named recipe (mnist: full size, official split, 32x32); options override it")
    group.add_argument("--preset", choices=list(PRESETS), help="UNet preset")
    group.add_argument("--conditional", action="store_true",
                       help="a class-conditional model (as many classes as the data has) with classifier-free "
                            "guidance; its run adds the guidance sweep")
    sections = PipelineConfig.sections()
    for key, (flag, help_text) in PIPELINE_OPTIONS.items():
        section, _, name = key.rpartition(".")
        if section == "diffusion" and not schedule_option:
            continue
        if section:
            field_options(group, sections[section], section, {name: flag}, getattr(DEFAULTS, section),
                          {name: help_text}, name_setting=True)
        else:   # a top-level setting (fid_extractor, rank_by)
            field = PipelineConfig.model_fields[name]
            group.add_argument(flag, dest=f".{name}", default=None, **_argument_kind(field),
                               help=f"{help_text} (sets {name}; default: {getattr(DEFAULTS, name)})")
    group.add_argument("--set", action="append", type=parse_setting, metavar="SECTION.FIELD=VALUE",
                       help="any other setting, e.g. --set train.ema_decay=0.995 --set model.dropout=0 "
                            f"(sections: {', '.join(sections)}); repeatable")
    group.add_argument("--show-config", action="store_true",
                       help="print the settings this command would run with, as JSON, and stop")
    parser.add_argument("--experiment", help=f"MLflow experiment (default: {contract.DEFAULT_EXPERIMENT})")


def sampler_options(parser: argparse.ArgumentParser, conditional: bool = False) -> None:
    """The SamplerConfig fields a person picks at a terminal; left out, SamplerConfig's own."""
    from ddpm.samplers import SamplerConfig

    group = parser.add_argument_group("sampler (ddpm.samplers.SamplerConfig)")
    field_options(group, SamplerConfig, "sampling", {"sampler": "--sampler", "num_steps": "--steps", "eta": "--eta",
                                                     "seed": "--seed", "batch_size": "--batch-size"})
    if conditional:
        guided = parser.add_argument_group("class-conditional models")
        guided.add_argument("--class", dest="class_label", type=int, metavar="K",
                            help="draw class K (default: every class in turn)")
        field_options(guided, SamplerConfig, "sampling", {"guidance_scale": "--guidance"})


def prepare_options(parser: argparse.ArgumentParser) -> None:
    from ddpm.data import DataConfig
    from tasks.config import RECIPES

    parser.add_argument("--recipe", choices=list(RECIPES), help="start from a recipe's data settings")
    field_options(parser, DataConfig, "data", {name: "--" + name.replace("_", "-") for name in DataConfig.model_fields})
    parser.add_argument("--out", help="parent folder (default $DDPM_HOME/data)")


def train_options(parser: argparse.ArgumentParser) -> None:
    from tasks import contract

    pipeline_options(parser, schedule_option=True)
    parser.add_argument("--run-name", help="MLflow run name")
    parser.add_argument("--resume", metavar="RUN_ID", type=run_id_argument,
                        help="continue an unfinished (crashed or killed) run from its newest valid checkpoint, "
                             "in the same MLflow run, with the configuration it was started with")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: the run is RUNNING but its process is gone (a preempted node, a "
                             "reboot); declare it dead and resume it (recorded on the run)")
    parser.add_argument("--promote", action="store_true", help="promote the best run afterwards")
    parser.add_argument("--model-name", default=contract.DEFAULT_MODEL_NAME, help="registered model for --promote")


def compare_options(parser: argparse.ArgumentParser) -> None:
    pipeline_options(parser, schedule_option=False)
    parser.add_argument("--schedules", nargs="+", help="noise schedules to compare")
    parser.add_argument("--num-timesteps", type=positive_int, help="T for every schedule")
    parser.add_argument("--max-parallel", type=positive_int, help="pipelines training at once")
    parser.add_argument("--dask-cluster", metavar="local|tcp://HOST:PORT",
                        help="run the pipelines on Dask: a temporary local cluster of --max-parallel processes, or "
                             "that scheduler (needs the dask extra)")


def evaluate_options(parser: argparse.ArgumentParser) -> None:
    from tasks.config import PipelineConfig

    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="MLflow run id")
    which.add_argument("--flow-run-id", help="Prefect flow-run id of the training")
    parser.add_argument("--fid-extractor", dest=".fid_extractor", default=None,
                        **_argument_kind(PipelineConfig.model_fields["fid_extractor"]),
                        help="FID features (default: the run's own)")
    parser.add_argument("--posthoc-ema", action="store_true",
                        help="also reconstruct a sweep of EMA widths from the run's post-hoc EMA snapshots "
                             "(trained with --set train.posthoc_ema=true), score each, keep the best; done "
                             "without asking for a run that kept snapshots")
    parser.add_argument("--sigma-rels", type=comma_list(float, "numbers"), metavar="S,S,...",
                        help="the widths to sweep (default 0.03,0.05,0.07,0.1,0.15,0.22)")
    parser.add_argument("--posthoc-steps", type=comma_list(int, "integers"), metavar="STEP,...",
                        help="snapshot steps to reconstruct at (default: the last)")
    parser.add_argument("--max-parallel", type=int, default=1, help="widths scored at once")
    parser.add_argument("--dask-cluster", metavar="local|tcp://HOST:PORT",
                        help="score the widths on Dask: a temporary local cluster of --max-parallel processes, or "
                             "that scheduler (needs the dask extra)")


# retrain's own settings: the sections it overlays on the reference run's configuration, and its rule
RETRAIN_SECTIONS = ("data", "train", "challenge")


def retrain_options(parser: argparse.ArgumentParser) -> None:
    """The retrain flow's parameters: its flow options, the challenge rule's fields, and the data and
    train shortcuts of PIPELINE_OPTIONS, which change only what they name in the reference's settings."""
    import inspect

    from ddpm.data import DataConfig
    from ddpm.training import PLACEMENT_FIELDS, TrainConfig
    from flows.retrain import retrain
    from tasks import contract
    from tasks.config import DEFAULTS
    from tasks.registry import ChallengeRule

    init = inspect.signature(retrain.fn).parameters["init"].default
    group = parser.add_argument_group("settings changed against the reference run's (the champion's source run, "
                                      "else the experiment's best run, else the pipeline's defaults)")
    for key, (flag, help_text) in PIPELINE_OPTIONS.items():
        section, _, name = key.rpartition(".")
        if section in ("data", "train"):
            # where a retrain runs is its own (the pipeline's defaults), not the reference run's
            default = (f"default: {getattr(DEFAULTS.train, name)}, not the reference run's" if name in PLACEMENT_FIELDS
                       else "default: the reference run's")
            field_options(group, {"data": DataConfig, "train": TrainConfig}[section], section, {name: flag},
                          helps={name: f"{help_text or DataConfig.model_fields[name].description} (sets {key}; "
                                       f"{default})"})
    group.add_argument("--set", action="append", type=parse_setting, metavar="SECTION.FIELD=VALUE",
                       help="any other data or train setting, e.g. --set train.warmup_steps=20 (sections: "
                            f"{', '.join(RETRAIN_SECTIONS)}); repeatable")
    group.add_argument("--show-config", action="store_true", help="print the flow's arguments as JSON and stop")
    rule = parser.add_argument_group("how the new run must beat the champion (tasks.registry.ChallengeRule)")
    field_options(rule, ChallengeRule, "challenge", {name: "--" + name.replace("_", "-")
                                                      for name in ChallengeRule.model_fields})
    parser.add_argument("--experiment", help=f"MLflow experiment (default: {contract.DEFAULT_EXPERIMENT})")
    parser.add_argument("--metric", help="FID metric that ranks the experiment's runs (default: the newest run's "
                                         "primary FID)")
    parser.add_argument("--model-name", default=contract.DEFAULT_MODEL_NAME,
                        help=f"registered model whose champion is the reference and is challenged (default: "
                             f"{contract.DEFAULT_MODEL_NAME})")
    parser.add_argument("--no-promote", action="store_true",
                        help="compare with the experiment's best run, and leave the registry alone")
    parser.add_argument("--init", choices=list(typing.get_args(typing.get_type_hints(retrain.fn)["init"])),
                        help=f"what a retrain on changed data starts from (default: {init})")
    parser.add_argument("--force", action="store_true",
                        help="train even when nothing changed, or when this very retrain was tried and lost")


def comma_list(convert, kind: str):
    """An argparse type: '0.05,0.1' -> [0.05, 0.1] with `convert` on each item; else one line naming `kind`."""
    def parse(text: str) -> list:
        try:
            return [convert(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} separated by commas, got {text!r}") from None

    return parse


def promote_options(parser: argparse.ArgumentParser) -> None:
    from flows.promote import PromoteConfig

    field_options(parser, PromoteConfig, "promote", {"experiments": "--experiment", "model_name": "--model-name",
                                                     "fingerprint": "--fingerprint", "metric": "--metric",
                                                     "max_images": "--max-images", "seeds": "--seeds",
                                                     "confidence": "--confidence", "min_margin": "--min-margin"},
                  helps={"experiments": "MLflow experiment to search (repeatable)"})
    kind = parser.add_mutually_exclusive_group()   # PromoteConfig.conditional: True, False or None (the newest run's)
    kind.add_argument("--conditional", dest="promote.conditional", action="store_const", const=True,
                      help="promote class-conditional models (default: the kind of the newest run)")
    kind.add_argument("--unconditional", dest="promote.conditional", action="store_const", const=False,
                      help="promote unconditional models")


def sample_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint file (step-XXXXXXX.pt)")
    source.add_argument("--model", help="registered model URI, e.g. models:/ddpm@champion")
    parser.add_argument("--num-images", type=positive_int, default=16)
    parser.add_argument("--out", help="output folder (default $DDPM_HOME/outputs/samples)")
    sampler_options(parser, conditional=True)


def dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (step-XXXXXXX.pt)")
    parser.add_argument("--dataset", default="digits",
                        help="a prepared dataset folder, or a data source to prepare (default digits)")
    parser.add_argument("--split", choices=["holdout", "train"], default="holdout",
                        help="which split the indices point into")
    parser.add_argument("--run-id", help="also log the grid to this MLflow run")


def interpolate_options(parser: argparse.ArgumentParser) -> None:
    dataset_options(parser)
    parser.add_argument("--a", type=int, default=0, help="index of the first image")
    parser.add_argument("--b", type=int, default=1, help="index of the second image")
    parser.add_argument("--t", type=int, default=500, help="diffusion step of the latent")
    parser.add_argument("--num", type=positive_int, default=8, help="number of lambdas from 0 to 1")
    parser.add_argument("--out", help="the grid's file (default $DDPM_HOME/outputs/interpolation.png)")
    sampler_options(parser)


def denoise_options(parser: argparse.ArgumentParser) -> None:
    dataset_options(parser)
    parser.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7])
    parser.add_argument("--t", type=int, nargs="+", default=[100, 250, 500, 750], help="diffusion steps")
    parser.add_argument("--out", help="the grid's file (default $DDPM_HOME/outputs/denoising.png)")
    sampler_options(parser)


def stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status"])


def deploy_options(parser: argparse.ArgumentParser) -> None:
    # shown in --help only: everything after `deploy` reaches the script as typed (main() does not
    # parse it; argparse refused a remainder that starts with an option, `--pool docker`)
    parser.add_argument("script_args", nargs="*", metavar="ARG",
                        help="passed on to scripts/deploy.sh as typed: --pool local|docker|kubernetes, and "
                             "`prefect deploy` options such as --name NAME")


def run_id_argument(text: str) -> str:
    """An MLflow run id: not empty (an unset shell variable must not start a fresh run instead)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected an MLflow run id, got an empty string (an unset variable?)")
    return text.strip()


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1..65535, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def serve_options(parser: argparse.ArgumentParser) -> None:
    from tasks import champion_server, contract
    from tasks.serving_http import Limits

    limits = Limits()
    parser.add_argument("--model-name", default=contract.DEFAULT_MODEL_NAME,
                        help=f"registered model whose '{contract.CHAMPION_ALIAS}' is served "
                             f"(default: {contract.DEFAULT_MODEL_NAME})")
    parser.add_argument("--host", default=champion_server.HOST,
                        help=f"address to listen on (default {champion_server.HOST}, this machine only); any "
                             f"other needs a token: ${champion_server.TOKEN_ENV} or --token-file")
    parser.add_argument("--port", type=port_number, default=champion_server.DEFAULT_PORT,
                        help=f"port (default {champion_server.DEFAULT_PORT})")
    parser.add_argument("--token-file", default=None,
                        help=f"a file whose first line is the token clients must send (Authorization: Bearer "
                             f"...); default ${champion_server.TOKEN_ENV}, if set")
    parser.add_argument("--reuse-port", action="store_true",
                        help="let several servers (replicas) listen on one port; the kernel spreads connections")
    parser.add_argument("--poll-seconds", type=positive_seconds, default=champion_server.DEFAULT_POLL_SECONDS,
                        help=f"how often the alias is looked at (default {champion_server.DEFAULT_POLL_SECONDS:g})")
    parser.add_argument("--check-seconds", type=positive_seconds, default=champion_server.DEFAULT_CHECK_SECONDS,
                        help="a new champion must load and answer its check request within this "
                             f"(default {champion_server.DEFAULT_CHECK_SECONDS:g})")
    parser.add_argument("--max-queue", type=positive_int, default=limits.max_queue,
                        help="requests admitted at once, drawing or waiting; past it 503 with Retry-After "
                             f"(default {limits.max_queue})")
    parser.add_argument("--max-batch-images", type=positive_int, default=limits.max_batch_images,
                        help=f"images drawn together in one batch (default {limits.max_batch_images})")
    parser.add_argument("--draw-threads", type=positive_int, default=limits.draw_threads,
                        help=f"batches drawn at once (default {limits.draw_threads}); each on 1 torch thread or "
                             "cores / draw-threads, whichever drew the version's check request faster")
    parser.add_argument("--request-seconds", type=positive_seconds, default=limits.request_seconds,
                        help="from arrival to answer; waiting past it 503, drawing past it 504 "
                             f"(default {limits.request_seconds:g})")
    parser.add_argument("--stop-seconds", type=positive_seconds, default=limits.stop_seconds,
                        help="at SIGTERM, requests in flight are finished within this, then cancelled "
                             f"(default {limits.stop_seconds:g})")
    parser.add_argument("--access-log", default="-",
                        help="one JSON line per request: '-' stdout (default), a file, or 'off'")


from flows.cli.gc import gc_options  # noqa: E402 (argparse only)


@dataclass(frozen=True)
class Command:
    help: str
    add_options: Callable[[argparse.ArgumentParser], None]
    handler: str   # "module:function", imported when the command runs


COMMANDS: dict[str, Command] = {
    "prepare": Command("prepare a dataset and print its folder and fingerprint", prepare_options,
                       "flows.cli.commands:prepare"),
    "train": Command("run the training pipeline (prepare, train, sample, FID)", train_options,
                     "flows.cli.commands:train"),
    "compare": Command("train one pipeline per noise schedule and compare FIDs", compare_options,
                       "flows.cli.commands:compare"),
    "evaluate": Command("FID of a finished training run's checkpoints", evaluate_options,
                        "flows.cli.commands:evaluate"),
    "promote": Command("register the best run by FID; move 'champion' if it wins", promote_options,
                       "flows.cli.commands:promote"),
    "retrain": Command("retrain if the data or settings changed since the champion (skip, warm start or from "
                       "scratch), then challenge it", retrain_options, "flows.cli.commands:retrain"),
    "sample": Command("images from a checkpoint or a registered model -> PNGs + grid.png", sample_options,
                      "flows.cli.images:sample"),
    "interpolate": Command("interpolate two real images through the diffused latent", interpolate_options,
                           "flows.cli.images:interpolate"),
    "denoise": Command("noise real images to x_t and reconstruct them", denoise_options, "flows.cli.images:denoise"),
    "stack": Command("start, stop or check the local Prefect server, worker and MLflow UI", stack_options,
                     "flows.cli.commands:stack"),
    "deploy": Command("register the flows' Prefect deployments (scripts/deploy.sh)", deploy_options,
                      "flows.cli.commands:deploy"),
    "gc": Command("free DDPM_HOME by the retention policy (--dry-run: say what would go)", gc_options,
                  "flows.cli.gc:gc"),
    "serve": Command("serve the registered model's champion over HTTP, following the alias with a check "
                     "and a rollback", serve_options, "flows.cli.serve:serve"),
}


def build_parser(commands: Iterable[str] | None = None, epilog: str = "") -> argparse.ArgumentParser:
    """The `ddpm` parser; the options of `commands` only (None: every command's; the others then
    parse nothing but --help's one line)."""
    parser = argparse.ArgumentParser(prog="ddpm", description="DDPM pipeline: train, compare, promote, sample.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = set(COMMANDS) if commands is None else set(commands)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        if name in wanted:
            command.add_options(sub)
            add_verbose(sub)
        sub.set_defaults(handler=command.handler)
    return parser


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(what argparse parses, what a pass-through command gets as typed): `ddpm deploy --pool docker`
    gives (["deploy"], ["--pool", "docker"]); --help stays argparse's."""
    if command_of(argv) != "deploy":
        return argv, []
    at = argv.index("deploy") + 1
    rest = argv[at:]
    if "-h" in rest or "--help" in rest:
        return argv, []
    return argv[:at], rest


def command_of(argv: list[str]) -> str | None:
    """The command an argument list names (its first word that is not an option), if known."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None
