"""The parsed command line -> the config objects the flows and functions take, validated once.

    pipeline_config(args)     PipelineConfig: the recipe, then --preset, the options, every --set
    pipeline_arguments(...)   a flow's keyword arguments: the sections it takes, its other options
    data_config(args)         DataConfig for `ddpm prepare`
    sampler_config(args, n)   SamplerConfig for sample / interpolate / denoise
    promote_config(args)      PromoteConfig for `ddpm promote`
    retrain_arguments(args)   the retrain flow's arguments: partial data / train / challenge sections

The options' values sit under their settings' dotted keys (flows.cli.parser.field_options); each
config applies exactly those, so everything else keeps the config's (or the recipe's) default.
"""

from __future__ import annotations

import inspect

from flows.cli.errors import CLIError
from flows.cli.parser import given_settings

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
    settings = given_settings(args)
    settings.update(dict(args.set or []))
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


def config_of(arguments: dict):
    """The PipelineConfig of a flow's arguments (the sections it does not take: the defaults)."""
    from tasks.config import PipelineConfig

    return PipelineConfig(**{k: v for k, v in arguments.items() if k in PipelineConfig.model_fields})


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


def retrain_arguments(args) -> dict:
    """`ddpm retrain`'s flow arguments: the data, train and challenge settings given, each a partial
    section (the flow overlays it on the reference run's configuration: only what is named
    changes), and the flow's options given."""
    from flows.cli.parser import RETRAIN_SECTIONS

    settings = given_settings(args)
    settings.update(dict(args.set or []))
    kwargs: dict = {}
    for key, value in settings.items():
        section, _, name = key.partition(".")
        if section not in RETRAIN_SECTIONS:
            raise CLIError(f"retrain takes {', '.join(RETRAIN_SECTIONS)} settings, not {key!r}: the rest of its "
                           "configuration is the reference run's (a new configuration: ddpm train)")
        kwargs.setdefault(section, {})[name] = value
    kwargs["promote_to"] = None if args.no_promote else args.model_name
    for name in ("experiment", "metric", "init"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.force:
        kwargs["force"] = True
    return kwargs


def data_config(args):
    """`ddpm prepare`'s DataConfig: the recipe's data settings (default: the pipeline's) with the options."""
    from tasks.config import recipe

    return recipe(args.recipe or "digits").with_settings(given_settings(args, "data")).data


def sampler_config(args, num_images: int = 1):
    """The SamplerConfig of the sampler options, drawing `num_images` (in batches of at most
    --batch-size); what was left out keeps SamplerConfig's own defaults."""
    from ddpm.samplers import SamplerConfig

    given = {key.partition(".")[2]: value for key, value in given_settings(args, "sampling").items()}
    class_label = getattr(args, "class_label", None)
    if class_label is not None:
        given["classes"] = (class_label,)
    batch_size = min(num_images, given.pop("batch_size", SamplerConfig.model_fields["batch_size"].default))
    return SamplerConfig(**given, num_images=num_images, batch_size=batch_size)


def promote_config(args):
    """`ddpm promote`'s PromoteConfig: the options given, PromoteConfig's defaults for the rest."""
    from flows.promote import PromoteConfig

    return PromoteConfig(**{key.partition(".")[2]: value for key, value in given_settings(args, "promote").items()})
