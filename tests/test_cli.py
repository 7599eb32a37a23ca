"""The `ddpm` command, run as a user runs it: in subprocesses, reading exit codes, stderr and files."""

import argparse
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import prefect.main  # noqa: F401  (configures Prefect's logging at collection: its console handler then
import pytest        # binds the real stderr, not the capture of the in-process test below, closed after it)
from mlflow.tracking import MlflowClient
from PIL import Image

from trained_runs import fake_trained_run, tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["prepare", "train", "compare", "evaluate", "promote", "retrain", "serve", "sample", "interpolate",
               "denoise", "stack", "deploy"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    return {**os.environ, "PYTHONPATH": str(REPO), "DDPM_HOME": str(home),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def ddpm(*args, env, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_console_script_is_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"ddpm": "flows.cli:main"}


@pytest.mark.slow
def test_every_subcommand_has_help(env, tmp_path):
    top = ddpm("--help", env=env, cwd=tmp_path)
    assert top.returncode == 0 and all(name in top.stdout for name in SUBCOMMANDS)
    for name in SUBCOMMANDS:
        result = ddpm(name, "--help", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: ddpm {name}")
    assert "--checkpoint" in ddpm("sample", "--help", env=env, cwd=tmp_path).stdout
    assert "--set SECTION.FIELD=VALUE" in ddpm("train", "--help", env=env, cwd=tmp_path).stdout


@pytest.mark.slow
def test_sample_from_a_checkpoint_writes_pngs_and_a_grid(checkpoint, env, tmp_path):
    result = ddpm("sample", "--checkpoint", checkpoint, "--num-images", 3, "--steps", 4, "--out", "out",
                  env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    assert sorted(Path(p).name for p in written["images"]) == ["image-000.png", "image-001.png", "image-002.png"]
    first = np.array(Image.open(tmp_path / "out" / "image-000.png"))
    assert first.shape == (16, 16) and first.dtype == np.uint8
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.size == ((2 * 18 + 2) * 8, (2 * 18 + 2) * 8)  # 2x2 tiles of 16 + 2 padding, enlarged 8x


@pytest.mark.slow
def test_sample_from_the_registered_champion(checkpoint, env, tmp_path, monkeypatch):
    from tasks.registry import promote_best

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("DDPM_HOME", env["DDPM_HOME"])
    fake_trained_run(MlflowClient(env["MLFLOW_TRACKING_URI"]), "ddpm", checkpoint, 3.0)
    promote_best("ddpm", "ddpm")

    by_model = ddpm("sample", "--model", "models:/ddpm@champion", "--num-images", 2, "--steps", 4, "--seed", 7,
                    "--out", "m", env=env, cwd=tmp_path)
    by_file = ddpm("sample", "--checkpoint", checkpoint, "--num-images", 2, "--steps", 4, "--seed", 7,
                   "--out", "c", env=env, cwd=tmp_path)
    assert by_model.returncode == 0 and by_file.returncode == 0, by_model.stderr + by_file.stderr
    for name in ("image-000.png", "image-001.png"):  # the registered EMA weights are the checkpoint's
        assert np.array_equal(np.array(Image.open(tmp_path / "m" / name)), np.array(Image.open(tmp_path / "c" / name)))

    unknown = ddpm("sample", "--model", "models:/ddpm@nobody", env=env, cwd=tmp_path)
    assert unknown.returncode == 1 and "models:/ddpm@nobody" in unknown.stderr and "Traceback" not in unknown.stderr
    too_many = ddpm("sample", "--model", "models:/ddpm@champion", "--num-images", 65, env=env, cwd=tmp_path)
    assert too_many.returncode == 1 and "'num_images' must be between 1 and 64" in too_many.stderr


@pytest.mark.slow   # 25 cases, ~16 s: the flows' validation through Prefect
@pytest.mark.parametrize("args, code, message", [
    (["sample", "--checkpoint", "missing.pt"], 1, "checkpoint not found: missing.pt"),
    (["sample", "--model", "models:/nobody@champion"], 1, "nobody"),
    (["sample", "--model", "ddpm@champion"], 1, "--model takes a models:/"),
    (["sample"], 2, "one of the arguments --checkpoint --model is required"),
    (["sample", "--checkpoint", "x.pt", "--steps", "0"], 2, "--steps: must be an integer >= 1"),
    (["sample", "--checkpoint", "x.pt", "--sampler", "euler"], 2, "invalid choice: 'euler'"),
    (["train", "--set", "lr=1"], 2, "expected SECTION.FIELD=VALUE"),
    (["train", "--set", "optimizer.lr=1"], 1, "unknown section 'optimizer'"),
    (["train", "--set", "train.lr=1"], 1, "train has no setting 'lr'"),
    (["train", "--set", "train.steps=-3"], 1, "steps: Input should be greater than or equal to 1"),
    (["sample", "--checkpoint", "x.pt", "--eta", "7"], 1, "eta: Input should be less than or equal to 1"),
    (["sample", "--checkpoint", "x.pt", "--guidance", "25"], 1, "guidance_scale: Input should be less than or equal"),
    (["train", "--set", "train.p_uncond=1"], 1, "p_uncond: Input should be less than 1"),
    (["train", "--set", "sampling.classes=[3]"], 1, "classes asked for, but this model is unconditional"),
    (["train", "--lr", "nan"], 1, "learning_rate: Input should be a finite number"),
    (["train", "--image-size", "32"], 1, "the data is 32x32 with 1 channel(s) but the model takes 16x16"),
    (["train", "--resume", "abc", "--steps", "5"], 1, "drop the options that set train"),
    (["train", "--resume", "abc", "--conditional"], 1, "drop the options that set --conditional"),
    (["train", "--fid-extractor", "bogus"], 2, "invalid choice: 'bogus'"),
    (["compare", "--set", "diffusion.num_timesteps=5"], 1, "sets the diffusion settings itself"),
    (["train", "--experiment", ""], 1, "experiment: String should have at least 1 character"),
    (["train", "--experiment", "../../../x"], 1, "experiment name '../../../x' is refused: it contains '/'"),
    (["train", "--set", "train.init_from=/gone/step-0000001.pt"], 1,
     "warm start from /gone/step-0000001.pt: no such checkpoint"),
    (["compare", "--schedules", "linear", "wobbly"], 1, "unknown noise schedule(s) ['wobbly']"),
    (["train", "--processes", "64"], 1, "train.num_processes=64 but this machine has"),
    (["train", "--processes", "3"], 1, "batch_size 64 (the global batch) is not divisible by world_size 3"),
    (["train", "--set", "train.nnodes=2"], 1, "nnodes=2 needs rdzv_endpoint"),
    (["compare", "--dask-cluster", "http://x:1"], 1, "dask_cluster: String should match pattern"),
    (["denoise", "--checkpoint", "missing.pt"], 1, "checkpoint not found"),
    (["evaluate"], 2, "one of the arguments --run-id --flow-run-id is required"),
    (["fly"], 2, "invalid choice: 'fly'"),
    (["train", "--max-images", "40", "--batch-size", "64", "--set", "sampling.num_images=8"], 1,
     "train.batch_size 64 is larger than the"),
    (["promote"], 1, "no finished run with an FID in experiment(s) ['ddpm']; train one first"),
    (["train", "--force"], 1, "--force declares a run dead to resume it: give the run with --resume RUN_ID"),
    (["train", "--resume", ""], 2, "--resume: expected an MLflow run id, got an empty string"),
    (["train", "--set", "train.device=cuda"], 1, "train.device='cuda' but this machine has no CUDA device"),
    (["train", "--set", "train.device=tpu"], 1, "train.device='tpu' is not a device name torch knows"),
    (["train", "--set", "train.device=xla"], 1, "this pipeline trains on cpu, cuda or mps"),
    (["train", "--set", "train.posthoc_ema=true", "--set", "train.posthoc_ema_sigma_rels=[0.05,0.5]"], 1,
     "sigma_rel 0.5 is outside (0, 0.2887)"),
    (["evaluate", "--run-id", "x", "--posthoc-ema", "--sigma-rels", "a,b"], 2, "expected numbers separated by commas"),
])
def test_bad_arguments_exit_nonzero_with_one_clear_line(args, code, message, env, tmp_path, monkeypatch, capsys):
    """`main(argv)` in this process (the console script's own entry point): a subprocess per case
    spent ~10 s importing torch, Prefect and MLflow again. The other tests here run subprocesses."""
    assert_one_error_line(args, code, message, env, tmp_path, monkeypatch, capsys)


def test_compiling_on_a_cpu_without_a_compiler_is_one_line_before_any_work(env, tmp_path, monkeypatch, capsys):
    import torch._inductor.config

    with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++",)}):   # inductor's own search finds none
        assert_one_error_line(["train", "--set", "train.compile=true", "--set", "train.device=cpu"], 1,
                              "train.compile on the CPU needs a C++ compiler", env, tmp_path, monkeypatch, capsys)
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["logs"]   # no data prepared, no store created


def assert_one_error_line(args, code, message, env, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    for name in ("DDPM_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.chdir(tmp_path)
    sigterm = signal.getsignal(signal.SIGTERM)   # main() installs its own handler
    try:
        returncode = main([str(a) for a in args])
    except SystemExit as exit:   # argparse's usage errors
        returncode = exit.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    stderr = capsys.readouterr().err
    assert returncode == code and message in stderr, stderr
    assert "Traceback" not in stderr and sum("error:" in line for line in stderr.splitlines()) == 1, stderr


def test_retrain_help_lists_its_options_generated_from_the_flow_and_its_configs(capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["retrain", "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and out.startswith("usage: ddpm retrain")
    for option in ("--source", "--steps", "--set SECTION.FIELD=VALUE", "--seeds", "--confidence", "--min-margin",
                   "--init {champion,scratch}", "--force", "--no-promote", "--model-name", "--verbose"):
        assert option in out, option
    assert "sets train.steps; default: the reference run's" in " ".join(out.split())


@pytest.mark.parametrize("args, code, message", [
    (["retrain", "--source", "folder:{tmp}/nowhere"], 1, "folder {tmp}/nowhere does not exist"),
    (["retrain", "--set", "model.dropout=0"], 1, "retrain takes data, train, challenge settings, not 'model.dropout'"),
    (["retrain", "--set", "train.lr=1"], 1, "train.lr"),
    (["retrain", "--confidence", "2"], 1, "confidence: Input should be less than 1"),
    (["retrain", "--seeds", "0"], 2, "--seeds: must be an integer >= 1"),
    (["retrain", "--init", "warm"], 2, "invalid choice: 'warm'"),
    (["retrain", "--source", "imagenet"], 1, "unknown source 'imagenet'"),
], ids=["missing-folder", "model-section", "unknown-train-setting", "confidence", "seeds", "init", "source-kind"])
def test_retrain_bad_input_is_one_line_before_prefect_starts(args, code, message, env, tmp_path, monkeypatch, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert_one_error_line(args, code, message.replace("{tmp}", str(tmp_path)), env, tmp_path, monkeypatch, capsys)
    assert not (tmp_path / "mlflow.db").exists()   # nothing started: no store created


@pytest.mark.slow
def test_a_failure_inside_a_flow_is_one_line_with_the_trace_in_the_log_file(env, tmp_path):
    """Prefect logs the traceback of a failing flow run; on the terminal only the message remains."""
    missing = "0" * 32
    result = ddpm("train", "--resume", missing, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("ddpm train: error:")]
    log = Path(env["DDPM_HOME"]) / "logs" / "ddpm.log"
    assert line == (f"ddpm train: error: no MLflow run with id '{missing}' in {env['MLFLOW_TRACKING_URI']} "
                    f"(full trace: {log}, or rerun with --verbose)")
    assert "Traceback" in log.read_text()


@pytest.mark.slow
def test_sample_a_class_with_guidance_and_refuse_it_for_an_unconditional_model(checkpoint, env, tmp_path):
    conditional = tiny_checkpoint(tmp_path / "conditional", num_classes=3)
    result = ddpm("sample", "--checkpoint", conditional, "--num-images", 2, "--steps", 3, "--class", 2,
                  "--guidance", 3, "--out", "out", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["images"]) == 2
    refused = ddpm("sample", "--checkpoint", conditional, "--steps", 3, "--class", 3, env=env, cwd=tmp_path)
    assert refused.returncode == 1 and "class(es) [3] outside this model's classes 0..2" in refused.stderr
    assert "Traceback" not in refused.stderr
    for args in (["--class", 1], ["--guidance", 2]):
        refused = ddpm("sample", "--checkpoint", checkpoint, "--steps", 3, *args, env=env, cwd=tmp_path)
        assert refused.returncode == 1 and "this model is unconditional" in refused.stderr, refused.stderr


@pytest.mark.slow
def test_denoise_and_interpolate_write_grids(checkpoint, env, tmp_path):
    common = ["--checkpoint", checkpoint, "--dataset", "digits", "--steps", 3]
    result = ddpm("denoise", *common, "--indices", 0, 1, 2, "--t", 20, 60, "--out", "d.png", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # rows: the real images, then x_t and its reconstruction for each t; 16 px tiles + 2 padding, 8x
    assert Image.open(tmp_path / "d.png").size == ((3 * 18 + 2) * 8, (5 * 18 + 2) * 8)

    result = ddpm("interpolate", *common, "--a", 0, "--b", 1, "--t", 50, "--num", 4, "--out", "i.png",
                  env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "i.png").size == ((6 * 18 + 2) * 8, (18 + 2) * 8)  # a, 4 mixtures, b

    # the default is under $DDPM_HOME, not the current folder; a path under a file is refused first
    result = ddpm("interpolate", *common, "--a", 0, "--b", 1, "--t", 50, "--num", 2, env=env, cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "home" / "outputs" / "interpolation.png").is_file(), result.stderr
    assert not (tmp_path / "interpolation.png").exists()
    under_a_file = ddpm("sample", "--checkpoint", checkpoint, "--out", "d.png/samples", env=env, cwd=tmp_path)
    assert under_a_file.returncode == 1 and "--out d.png/samples: d.png is a file, not a folder" in under_a_file.stderr

    out_of_range = ddpm("denoise", *common, "--indices", 100000, env=env, cwd=tmp_path)
    assert out_of_range.returncode == 1 and "image index 100000 is out of range" in out_of_range.stderr
    bad_t = ddpm("denoise", *common, "--t", 100, env=env, cwd=tmp_path)  # T = 100: t must be < 100
    assert bad_t.returncode == 1 and "t must be in [0, 100)" in bad_t.stderr


def test_sampler_options_default_to_the_sampler_config_defaults():
    from ddpm.samplers import SAMPLERS, SamplerConfig
    from flows.cli.configs import sampler_config
    from flows.cli.parser import build_parser

    parser = build_parser()
    sampler_option = next(a for a in parser._subparsers._group_actions[0].choices["sample"]._actions
                          if "--sampler" in a.option_strings)
    assert sampler_option.choices == list(SAMPLERS)   # generated from the registry, not a copy
    left_out = sampler_config(parser.parse_args(["sample", "--checkpoint", "x.pt"]), 16)
    assert left_out == SamplerConfig(num_images=16, batch_size=16)
    given = sampler_config(parser.parse_args(["sample", "--checkpoint", "x.pt", "--sampler", "ddim", "--steps", "7",
                                              "--eta", "0", "--guidance", "3"]), 16)
    assert (given.sampler, given.num_steps, given.eta, given.guidance()) == ("ddim", 7, 0.0, 3.0)


def test_train_options_map_onto_the_pipeline_parameters():
    from flows.cli.commands import lazy_flow
    from flows.cli.configs import pipeline_arguments
    from flows.cli.errors import CLIError
    from flows.cli.parser import build_parser
    from flows.train_pipeline import train_pipeline
    from tasks.config import DEFAULTS

    args = build_parser().parse_args([
        "train", "--steps", "12", "--schedule", "cosine", "--source", "digits", "--max-images", "200",
        "--preset", "tiny-16", "--set", "model.base_channels=8", "--set", "train.ema_decay=0.99",
        "--experiment", "e", "--num-samples", "8"])
    kwargs = pipeline_arguments(train_pipeline, args)
    assert kwargs["train"].steps == 12 and kwargs["train"].ema_decay == 0.99
    assert kwargs["train"] == DEFAULTS.train.model_copy(update={"steps": 12, "ema_decay": 0.99})  # the rest: defaults
    assert kwargs["diffusion"].schedule == "cosine" and kwargs["data"].max_images == 200
    assert kwargs["model"].base_channels == 8 and kwargs["sampling"].num_images == 8
    assert kwargs["experiment"] == "e"
    with pytest.raises(CLIError, match="flows.nope.flow is not available"):
        lazy_flow("flows.nope", "flow")
    with pytest.raises(argparse.ArgumentTypeError):
        from flows.cli.parser import parse_setting
        parse_setting("no-equals-sign")


def test_recipe_options_start_from_the_recipe_and_options_override_it():
    from ddpm.unet import preset
    from flows.cli.configs import pipeline_arguments
    from flows.cli.parser import build_parser
    from flows.train_pipeline import train_pipeline
    from tasks.config import DEFAULTS, recipe

    args = build_parser().parse_args(["train", "--recipe", "mnist", "--source", "mnist:/data/mnist", "--steps", "7"])
    kwargs = pipeline_arguments(train_pipeline, args)
    mnist = recipe("mnist")
    assert kwargs["data"] == mnist.data.model_copy(update={"source": "mnist:/data/mnist"})
    assert kwargs["data"].split == "official" and kwargs["data"].resize == "pad" and kwargs["data"].image_size == 32
    assert kwargs["model"] == mnist.model == preset("tiny-32") and kwargs["sampling"] == mnist.sampling
    assert kwargs["train"] == mnist.train.model_copy(update={"steps": 7})
    assert mnist.train == DEFAULTS.train.model_copy(update={"steps": 2000})   # the recipe's one change to train
    # a preset replaces the recipe's model but keeps it conditional
    args = build_parser().parse_args(["train", "--recipe", "digits-conditional", "--preset", "small-16"])
    assert pipeline_arguments(train_pipeline, args)["model"] == preset("small-16", num_classes=10)


@pytest.mark.skipif(not (REPO.parent / "shared/data/mnist-full/train-images-idx3-ubyte.gz").exists(),
                    reason="../shared/data/mnist-full not found")
@pytest.mark.slow
def test_prepare_mnist_official_split_from_the_command_line(tmp_path, env):
    source = f"mnist:{REPO.parent / 'shared/data/mnist-full'}"
    done = ddpm("prepare", "--recipe", "mnist", "--source", source, "--out", tmp_path / "data", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["splits"] == {"train": 60000, "holdout": 10000}
    bad = ddpm("prepare", "--source", "digits", "--split", "official", "--out", tmp_path / "data", env=env, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "ddpm prepare: error: source 'digits' has no official train/test split; use split='random'")


def test_conditional_takes_the_class_count_from_the_data(tmp_path, monkeypatch):
    from flows.cli.commands import lazy_flow
    from flows.cli.configs import pipeline_arguments
    from flows.cli.parser import build_parser

    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    flow = lazy_flow("flows.train_pipeline", "train_pipeline")
    kwargs = pipeline_arguments(flow, build_parser().parse_args(["train", "--conditional", "--steps", "5"]))
    assert kwargs["model"].num_classes == 10 and kwargs["train"].steps == 5


def test_show_config_prints_the_settings_and_runs_nothing(tmp_path, monkeypatch, capsys):
    """`--show-config` prints what would run, compare's per-schedule diffusion settings included,
    and starts no server, no run and no data preparation (DDPM_HOME holds only the log folder)."""
    from flows.cli import main
    from tasks.config import DEFAULTS

    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    assert main(["train", "--show-config", "--steps", "7", "--set", "model.dropout=0.1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"] == DEFAULTS.train.model_copy(update={"steps": 7}).model_dump(mode="json")
    assert shown["model"]["dropout"] == 0.1 and shown["fid_extractor"] == "auto"
    assert main(["compare", "--show-config", "--schedules", "linear", "cosine", "--num-timesteps", "500"]) == 0
    diffusion = json.loads(capsys.readouterr().out)["diffusion"]
    assert diffusion == {name: DEFAULTS.diffusion.model_copy(update={"schedule": name, "num_timesteps": 500})
                         .model_dump(mode="json") for name in ("linear", "cosine")}
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["logs"]


def test_deploy_passes_everything_after_it_to_the_script_as_typed():
    """`ddpm deploy --pool docker` was refused by argparse (a remainder may not start with an option)."""
    from flows.cli.parser import build_parser, split_passthrough

    parsed, rest = split_passthrough(["deploy", "--pool", "docker", "--name", "train-docker"])
    assert rest == ["--pool", "docker", "--name", "train-docker"]
    assert build_parser(["deploy"]).parse_args(parsed).command == "deploy"
    assert split_passthrough(["deploy", "--help"]) == (["deploy", "--help"], [])
    assert split_passthrough(["train", "--steps", "5"]) == (["train", "--steps", "5"], [])


def test_a_server_that_is_down_is_one_line_naming_it_before_anything_starts(env, tmp_path, monkeypatch, capsys):
    """Was a 70-line HTTP client traceback (MLflow) or a hang then a traceback (Prefect)."""
    import socket

    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    assert_one_error_line(["train", "--steps", "1"], 1, f"the MLflow tracking server (MLFLOW_TRACKING_URI) at "
                          f"http://127.0.0.1:{port} is unreachable", down, tmp_path, monkeypatch, capsys)
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    assert_one_error_line(["promote"], 1, f"the Prefect API (PREFECT_API_URL) at http://127.0.0.1:{port}/api is "
                          "unreachable", env, tmp_path, monkeypatch, capsys)
    assert not (tmp_path / "home" / "data").exists()   # nothing prepared
