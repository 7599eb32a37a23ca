"""The training engine: exact resume (in process and after kill -9), damaged checkpoints, NaN stops,
keep_last, EMA and learning-rate warm-up, gradient accumulation, config validation, metrics, and
DDP on CPU (gloo, 2 processes under torchrun) against one process.

Everything runs the tiny-16 UNet for a few steps on one intra-op thread per process: the 2 cores
are shared, and oversubscribed threads make a step ~100x slower here.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from ddpm.checkpoint import CheckpointError, file_sha256, list_checkpoints, load_checkpoint, verify_checkpoint
from ddpm.data import BatchLoader, DataConfig, prepare_dataset
from ddpm.diffusion import DiffusionConfig
from ddpm.training import (NonFiniteLossError, TrainConfig, Trainer, check_compiler, current_decay,
                           dataset_trainer, lr_factor)
from ddpm.unet import preset

REPO = Path(__file__).resolve().parents[1]
MODEL = preset("tiny-16")  # dropout 0
DIFFUSION = DiffusionConfig()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *([1, 16, 16])), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


IMAGES = random_images()


def config(**overrides) -> TrainConfig:
    base = dict(steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=3, ema_decay=0.999, log_every=1,
                checkpoint_every=3, keep_last=3)
    return TrainConfig(**{**base, **overrides})


def make_trainer(cfg: TrainConfig, checkpoint_dir=None, images=IMAGES, batch_fn=None) -> Trainer:
    loader = BatchLoader(images, batch_size=cfg.micro_batch_size, seed=cfg.seed, hflip=cfg.hflip)
    return Trainer(MODEL, DIFFUSION, cfg, batch_fn or loader.batch, checkpoint_dir)


def training_state(state: dict) -> dict:
    return {key: state[key] for key in ("step", "model", "ema", "optimizer", "lr_scheduler")}


def assert_equal_states(a, b, path="state"):
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path} keys differ"
        for key in a:
            assert_equal_states(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path} lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


def max_param_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory) -> Path:
    """205 train images of 16x16 digits, prepared as the pipeline does."""
    return Path(prepare_dataset(DataConfig(max_images=256), tmp_path_factory.mktemp("data")))


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}


def cli(prepared: Path, checkpoint_dir: Path, cfg: TrainConfig, result: Path | None = None) -> list[str]:
    args = [sys.executable, "-m", "ddpm.train_ddp", "--data", str(prepared), "--checkpoint-dir", str(checkpoint_dir),
            "--model", "tiny-16", "--train", cfg.model_dump_json(), "--no-progress"]
    return args + (["--result", str(result)] if result else [])


# --- resume ---------------------------------------------------------------------------------


def test_resume_in_process_is_bit_exact(tmp_path):
    """6 steps straight == 3 steps, a new Trainer resuming from the step-3 checkpoint, 3 more."""
    cfg = config(steps=6, checkpoint_every=3)
    straight = make_trainer(cfg, tmp_path / "straight")
    straight_result = straight.train(progress=False)

    first = make_trainer(cfg, tmp_path / "split")
    first.train(progress=False, stop_at=3)
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step-0000003.pt"]
    second = make_trainer(cfg, tmp_path / "split")
    second_result = second.train(progress=False)

    assert second_result.resumed_from == 3
    assert second.step == straight.step == 6
    assert_equal_states(training_state(second.state_dict()), training_state(straight.state_dict()))
    assert second_result.loss_history == straight_result.loss_history[3:]


def test_resume_with_a_changed_learning_rate_is_refused_and_more_steps_are_allowed(tmp_path):
    """The optimizer state holds the old rate: a changed rate would be recorded but not applied."""
    make_trainer(config(steps=3), tmp_path).train(progress=False)
    before = sorted(p.read_bytes() for p in list_checkpoints(tmp_path))
    with pytest.raises(CheckpointError, match=r"learning_rate 0\.001 -> 0\.002"):
        make_trainer(config(steps=6, learning_rate=2e-3), tmp_path).train(progress=False)
    assert sorted(p.read_bytes() for p in list_checkpoints(tmp_path)) == before   # nothing written
    resumed = make_trainer(config(steps=6, log_every=2), tmp_path).train(progress=False)
    assert resumed.resumed_from == 3 and resumed.step == 6


def test_the_engines_own_command_line_says_a_fixable_mistake_in_one_line(tmp_path, prepared_data, capsys):
    """`python -m ddpm.train_ddp` printed 17-line tracebacks whose last line was the message."""
    from ddpm.train_ddp import main

    base = ["--data", str(prepared_data), "--checkpoint-dir", str(tmp_path), "--model", "tiny-16", "--no-progress"]
    assert main([*base, "--train", config(steps=2).model_dump_json()]) == 0
    capsys.readouterr()
    cases = [(config(steps=4, learning_rate=2e-3).model_dump_json(), r"learning_rate 0.001 -> 0.002"),
             ('{"device": "cuda"}', "train.device='cuda' but this machine has no CUDA device"),
             ('{"steps": 0}', "steps: Input should be greater than or equal to 1"),
             ("{bad json", "take a JSON object or file")]
    for train, message in cases:
        assert main([*base, "--train", train]) == 1, train
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(CheckpointError):   # --verbose: the traceback
        main([*base, "--train", cases[0][0], "--verbose"])


def test_the_run_says_early_how_long_it_will_take(capsys):
    """After 5 timed steps (the first, which may compile, not counted), one line: s/step and the rest's duration."""
    from ddpm.progress import duration

    make_trainer(config(steps=8, log_every=2)).train(progress=False)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("train:")]
    assert re.fullmatch(r"train: [0-9.e+-]+ s/step here: the 2 steps left take about \d+ s", line), line
    assert (duration(2.5e11), duration(90), duration(7200), duration(45)) == ("7,922 years", "1.5 min", "2 h", "45 s")


def test_a_stop_whose_signal_was_swallowed_still_stops_training_at_the_next_step(tmp_path):
    """SIGTERM's KeyboardInterrupt can land in a callback that swallows it (SQLAlchemy's cleanup):
    the CLI's handler also sets STOP_REQUESTED, which the loop checks before every step."""
    import signal as signals

    from ddpm.stop import STOP_REQUESTED, StopRequested
    from flows.cli.errors import stop_on_sigterm

    previous = signals.getsignal(signals.SIGTERM)
    stop_on_sigterm()
    trainer = make_trainer(config(steps=6, checkpoint_every=2), tmp_path)
    try:
        def swallowed(step, path):   # the handler's raise lost, as in a weakref callback
            if step == 2:
                try:
                    signals.getsignal(signals.SIGTERM)(signals.SIGTERM, None)
                except KeyboardInterrupt:
                    pass
        with pytest.raises(StopRequested, match="before step 3"):
            trainer.train(progress=False, on_checkpoint=swallowed)
    finally:
        STOP_REQUESTED.clear()
        signals.signal(signals.SIGTERM, previous)
    assert trainer.step == 2 and [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002.pt"]


def test_checkpoint_holds_everything_and_loads_weights_only(tmp_path):
    cfg = config(steps=2, checkpoint_every=2)
    make_trainer(cfg, tmp_path).train(progress=False)
    state = load_checkpoint(tmp_path / "step-0000002.pt")  # torch.load(weights_only=True) inside
    assert {"step", "model", "ema", "optimizer", "lr_scheduler", "rng", "model_config", "diffusion_config",
            "train_config"} <= state.keys()
    assert state["step"] == 2 and TrainConfig(**state["train_config"]) == cfg
    assert state["rng"]["torch"].dtype == torch.uint8 and state["rng"]["generator"].dtype == torch.uint8
    assert int(state["ema"]["n_averaged"]) == 2


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_uninterrupted_run(tmp_path, prepared_data):
    """A real SIGKILL of a training process once a mid-run checkpoint exists; a new process resumes
    to the end; the final model, EMA and optimizer equal those of an uninterrupted run bit for bit."""
    cfg = config(steps=60, checkpoint_every=5, keep_last=2, warmup_steps=10, log_every=10)
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(cli(prepared_data, run_dir, cfg), env=subprocess_env(), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list_checkpoints(run_dir):  # a checkpoint appears under its real name only when complete
        assert process.poll() is None, f"training exited early: {process.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    on_disk = [int(p.name[5:12]) for p in list_checkpoints(run_dir)]
    assert on_disk and max(on_disk) < cfg.steps, f"the run was not interrupted mid-way: {on_disk}"
    print(f"SIGKILLed with checkpoints of steps {on_disk} on disk (of {cfg.steps})")

    result_file = tmp_path / "resumed.json"
    subprocess.run(cli(prepared_data, run_dir, cfg, result_file), env=subprocess_env(), cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    resumed = json.loads(result_file.read_text())
    assert resumed["resumed_from"] == max(on_disk) and resumed["step"] == cfg.steps

    reference = dataset_trainer(prepared_data, MODEL, DIFFUSION, cfg, tmp_path / "uninterrupted")
    reference.train(progress=False)
    final = load_checkpoint(run_dir / f"step-{cfg.steps:07d}.pt")
    assert_equal_states(training_state(final), training_state(reference.state_dict()))


# --- damaged checkpoints, NaN, keep_last ---------------------------------------------------


def test_a_newest_checkpoint_that_matches_its_checksum_but_does_not_load_is_passed_over(tmp_path, capsys):
    make_trainer(config(steps=6, checkpoint_every=2), tmp_path).train(progress=False)
    newest = tmp_path / "step-0000006.pt"
    newest.write_bytes(b"not a torch file")
    (tmp_path / "step-0000006.pt.sha256").write_text(f"{file_sha256(newest)}  step-0000006.pt\n")
    capsys.readouterr()
    result = make_trainer(config(steps=6, checkpoint_every=2), tmp_path).train(progress=False)
    assert "step-0000006.pt could not be loaded" in capsys.readouterr().out
    assert result.resumed_from == 4 and (tmp_path / "step-0000006.pt.corrupt").read_bytes() == b"not a torch file"


def test_corrupt_newest_checkpoint_is_named_kept_aside_and_the_previous_one_used(tmp_path, capsys):
    cfg = config(steps=6, checkpoint_every=2)
    make_trainer(cfg, tmp_path).train(progress=False, stop_at=6)
    newest = tmp_path / "step-0000006.pt"
    damaged = newest.read_bytes()[: newest.stat().st_size // 2]  # truncated, as by a full disk
    newest.write_bytes(damaged)
    capsys.readouterr()

    resumed = make_trainer(config(steps=8, checkpoint_every=2), tmp_path)
    result = resumed.train(progress=False)

    message = capsys.readouterr().out
    assert "step-0000006.pt is corrupt" in message and "step-0000006.pt.corrupt" in message
    assert result.resumed_from == 4
    assert (tmp_path / "step-0000006.pt.corrupt").read_bytes() == damaged  # kept aside, never overwritten
    verify_checkpoint(newest)  # step 6 written again, valid this time
    straight = make_trainer(config(steps=8, checkpoint_every=2))
    straight.train(progress=False)
    assert_equal_states(resumed.state_dict()["model"], straight.state_dict()["model"])


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = config(steps=8, checkpoint_every=2)
    loader = BatchLoader(IMAGES, batch_size=cfg.micro_batch_size)

    def batch_with_nan_at_step_5(index):
        x = loader.batch(index)
        return x * float("nan") if index == 4 else x  # micro-batch 4 is step 5's (no accumulation)

    trainer = make_trainer(cfg, tmp_path, batch_fn=batch_with_nan_at_step_5)
    trainer.train(progress=False, stop_at=4)
    good = tmp_path / "step-0000004.pt"
    checksum = file_sha256(good)

    trainer = make_trainer(cfg, tmp_path, batch_fn=batch_with_nan_at_step_5)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5\b"):
        trainer.train(progress=False)
    assert file_sha256(good) == checksum
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002.pt", "step-0000004.pt"]
    assert trainer.step == 4  # the bad step made no update
    assert_equal_states(trainer.model.state_dict(), load_checkpoint(good)["model"])


def test_keep_last_keeps_the_newest_k_with_their_checksums(tmp_path):
    make_trainer(config(steps=5, checkpoint_every=1, keep_last=2), tmp_path).train(progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-0000004.pt", "step-0000004.pt.sha256", "step-0000005.pt", "step-0000005.pt.sha256"]


# --- recipe: warm-ups, EMA, accumulation, validation, metrics -------------------------------


def test_lr_warmup_ema_warmup_and_logged_metrics():
    cfg = config(steps=6, warmup_steps=4, learning_rate=1e-3, ema_decay=0.999)
    trainer = make_trainer(cfg)
    logged = []
    ema_expected = None
    for step in range(1, cfg.steps + 1):
        trainer.train(progress=False, stop_at=step, on_log=lambda s, m: logged.append((s, m)))
        params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        # AveragedModel copies on its first update, then ema <- d ema + (1 - d) param, d = (1+n)/(10+n)
        if ema_expected is None:
            ema_expected = params
        else:
            d = current_decay(0.999, True, step - 1)
            ema_expected = {k: d * ema_expected[k] + (1 - d) * params[k] for k in params}
        ema = {k.removeprefix("module."): v for k, v in trainer.ema.state_dict().items() if k != "n_averaged"}
        assert max_param_difference(ema, ema_expected) < 1e-6

    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    for _, metrics in logged:
        assert metrics.keys() == {"loss", "lr", "grad_norm", "images_per_second", "ema_decay"}
        assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0 and metrics["images_per_second"] > 0
    assert [m["lr"] for _, m in logged] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert [m["ema_decay"] for _, m in logged] == pytest.approx([0.0, 2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15])
    # the EMA lags the raw weights
    assert max_param_difference(ema_expected, params) > 1e-4


def has_compiler() -> bool:
    try:
        check_compiler(torch.device("cpu"))
    except ValueError:
        return False
    return True


@pytest.mark.slow   # ~50 s: inductor builds its C++ kernels with gcc
@pytest.mark.skipif(not has_compiler(), reason="no C++ compiler for inductor")
def test_compiled_training_compiles_once_follows_eager_and_its_checkpoints_resume_eagerly(tmp_path):
    """train.compile on the CPU (inductor): one compilation in the first step, reported as
    compile_seconds and kept out of images/s; no recompilation in later steps; the losses and
    weights follow eager training to float tolerance (fused kernels round differently); the
    checkpoints hold the plain module's keys, so an eager Trainer resumes a compiled run."""
    from torch._dynamo.utils import counters

    # the smallest UNet with every block kind: compiling tiny-16 takes a minute on 2 cores
    model = MODEL.model_copy(update={"base_channels": 8, "channel_mults": (1,), "num_groups": 4,
                                     "attention_resolutions": (16,), "middle_attention": False})
    cfg = config(steps=4, checkpoint_every=2, log_every=2)
    loader = BatchLoader(IMAGES, batch_size=cfg.batch_size, seed=cfg.seed)
    eager = Trainer(model, DIFFUSION, cfg, loader.batch, tmp_path / "eager").train(progress=False)

    torch._dynamo.reset()
    counters.clear()
    compiled = Trainer(model, DIFFUSION, cfg.model_copy(update={"compile": True}), loader.batch, tmp_path / "compiled")
    logged, graphs = [], []
    result = compiled.train(progress=False, on_log=lambda s, m: (logged.append(m), graphs.append(
        counters["stats"]["unique_graphs"])))
    assert graphs[0] == 1 and graphs[-1] == 1   # compiled in the first step, never again
    assert result.compile_seconds > 0 and logged[0]["compile_seconds"] == result.compile_seconds
    assert "compile_seconds" not in logged[1]
    # the first window's images/s is its second step's: the compiling step is far slower
    assert logged[0]["images_per_second"] > 2 * cfg.batch_size / result.compile_seconds
    assert [loss for _, loss in result.loss_history] == pytest.approx([loss for _, loss in eager.loss_history],
                                                                      rel=1e-4)

    plain = load_checkpoint(tmp_path / "eager" / "step-0000004.pt")
    from_compiled = load_checkpoint(tmp_path / "compiled" / "step-0000004.pt")
    assert from_compiled["model"].keys() == plain["model"].keys() and from_compiled["ema"].keys() == plain["ema"].keys()
    assert max_param_difference(from_compiled["model"], plain["model"]) < 1e-4
    assert max_param_difference(from_compiled["ema"], plain["ema"]) < 1e-4

    # a window of the compiling step alone tells no throughput, and the run's figure leaves it out
    # (dynamo reuses the code compiled above for this model of the same structure)
    alone = Trainer(model, DIFFUSION, cfg.model_copy(update={"compile": True, "log_every": 1}), loader.batch, None)
    logged = []
    result = alone.train(progress=False, on_log=lambda s, m: logged.append(m))
    assert "images_per_second" not in logged[0] and logged[0]["compile_seconds"] == result.compile_seconds
    assert all("images_per_second" in m and "compile_seconds" not in m for m in logged[1:])
    timed = [cfg.batch_size / m["images_per_second"] for m in logged[1:]]
    assert result.images_per_second == pytest.approx(3 * cfg.batch_size / sum(timed), rel=1e-6)

    for step_4 in (tmp_path / "compiled").glob("step-0000004.*"):
        step_4.unlink()
    resumed = Trainer(model, DIFFUSION, cfg, loader.batch, tmp_path / "compiled")
    assert resumed.train(progress=False).resumed_from == 2
    assert max_param_difference(resumed.model.state_dict(), from_compiled["model"]) < 1e-4


def test_compiling_on_the_cpu_without_a_compiler_is_refused_before_training(tmp_path):
    import torch._inductor.config

    no_compiler = torch._inductor.config.patch({"cpp.cxx": ("no-such-c++",)})   # inductor's own search finds none
    with no_compiler, pytest.raises(ValueError, match=r"train.compile on the CPU needs a C\+\+ compiler"):
        make_trainer(config(compile=True, device="cpu"), tmp_path)
    assert not list(tmp_path.iterdir())


def test_cosine_lr_schedule_decays_from_the_end_of_the_warm_up_to_zero():
    cfg = config(steps=10, warmup_steps=2, learning_rate=1e-3, lr_schedule="cosine", log_every=1)
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert [lr_factor(cfg, s) for s in range(10)] == pytest.approx(expected)
    assert lr_factor(cfg, 9) < 0.04 and lr_factor(cfg, 10) == 0.0
    assert [lr_factor(cfg.model_copy(update={"lr_schedule": "constant"}), s) for s in range(4)] == [0.5, 1, 1, 1]
    logged = []
    make_trainer(cfg).train(progress=False, on_log=lambda s, m: logged.append(m["lr"]))
    assert logged == pytest.approx([1e-3 * f for f in expected])


def test_ema_decay_is_capped_by_the_configured_decay():
    assert current_decay(0.5, True, 100) == 0.5
    assert current_decay(0.9999, True, 0) == pytest.approx(0.1)
    assert current_decay(0.9999, False, 0) == 0.9999


def test_gradient_accumulation_equals_one_big_batch():
    """batch 16 in 2 micro-batches of 8 == batch 16 at once, to float rounding.

    What makes them equal: micro-batch indices step*2 + m of a BatchLoader with batch 8 hold the
    same images as index `step` of one with batch 16 (while both are in the same epoch: the image
    count is a multiple of 16 here, and hflip is off since flips are drawn per loader index), and
    t/noise are drawn for the whole global batch, each micro-batch taking its slice.
    """
    whole = make_trainer(config(steps=4, batch_size=16, grad_accum_steps=1))
    split = make_trainer(config(steps=4, batch_size=16, grad_accum_steps=2))
    whole_result, split_result = whole.train(progress=False), split.train(progress=False)
    whole_losses = [loss for _, loss in whole_result.loss_history]
    split_losses = [loss for _, loss in split_result.loss_history]
    assert split_losses == pytest.approx(whole_losses, rel=1e-5)
    # Adam divides by sqrt(v): rounding-level gradient differences move a weight by up to a
    # fraction of lr (1e-3); a different data/noise draw moves weights by ~lr per step.
    assert max_param_difference(split.model.state_dict(), whole.model.state_dict()) < 1e-4
    other_images = BatchLoader(IMAGES, batch_size=16, seed=1).batch  # same init and noise, other images
    other = make_trainer(config(steps=4, batch_size=16), batch_fn=other_images)
    other.train(progress=False)
    assert max_param_difference(other.model.state_dict(), whole.model.state_dict()) > 1e-3


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"batch_size": 10, "grad_accum_steps": 4}, "grad_accum_steps"),
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"steps": 0}, "steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"lr": 1e-4}, "lr"),  # unknown field
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValidationError, match=field):
        TrainConfig(**overrides)


def test_batch_that_cannot_be_split_over_ranks_or_a_wrong_batch_shape_is_refused():
    with pytest.raises(ValueError, match="world_size 3"):
        config(batch_size=8).rank_micro_batch_size(3)
    trainer = make_trainer(config(batch_size=8), batch_fn=lambda i: torch.zeros(4, 1, 16, 16))
    with pytest.raises(ValueError, match=r"shape \(4, 1, 16, 16\).*\(8, 1, 16, 16\)"):
        trainer.train(progress=False)


# --- DDP ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path, prepared_data):
    """torchrun, gloo, 2 ranks x 8 images == 1 process x 16 images: same per-step loss and weights."""
    cfg = config(steps=6, batch_size=16, checkpoint_every=3, log_every=1)
    result_file = tmp_path / "ddp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *cli(prepared_data, tmp_path / "ddp", cfg, result_file)[1:]]
    done = subprocess.run(command, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads(result_file.read_text())
    assert ddp["world_size"] == 2 and ddp["step"] == cfg.steps

    single = dataset_trainer(prepared_data, MODEL, DIFFUSION, cfg, tmp_path / "single")
    single_result = single.train(progress=False)
    ddp_losses = [loss for _, loss in ddp["loss_history"]]
    single_losses = [loss for _, loss in single_result.loss_history]
    difference = max(abs(a - b) for a, b in zip(ddp_losses, single_losses))
    print(f"DDP (2 x 8) vs single process (16): max loss difference {difference:.2e} over {cfg.steps} steps")
    assert len(ddp_losses) == cfg.steps and difference < 1e-5
    # rank 0 alone wrote the checkpoints: exactly the expected files, no stray temporaries
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "step-0000003.pt", "step-0000003.pt.sha256", "step-0000006.pt", "step-0000006.pt.sha256"]
    final = load_checkpoint(tmp_path / "ddp" / "step-0000006.pt")
    assert final["world_size"] == 2
    assert max_param_difference(final["model"], single.model.state_dict()) < 1e-4  # Adam: see accumulation test


def test_a_runs_checkpoints_are_found_in_its_tagged_folder_else_its_run_folder(tmp_path, monkeypatch):
    """Evaluation, promotion and resume find a run's checkpoints the same way (tasks.run_files):
    a stale `checkpoint_dir` tag (DDPM_HOME moved, a container's path) falls back to the run folder."""
    from types import SimpleNamespace

    from trained_runs import tiny_checkpoint

    from ddpm.checkpoint import checkpoint_step, load_model
    from tasks import contract, run_files

    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    run_folder = tmp_path / "home" / "runs" / "abc" / "checkpoints"
    checkpoint = tiny_checkpoint(run_folder, steps=2)
    assert checkpoint_step(checkpoint) == 2 and load_model(checkpoint)[2]["step"] == 2

    def run(tags):
        return SimpleNamespace(info=SimpleNamespace(run_id="abc"), data=SimpleNamespace(tags=tags))

    stale = run({contract.CHECKPOINT_DIR_TAG: str(tmp_path / "gone")})
    assert run_files.checkpoint_folders(stale) == [tmp_path / "gone", run_folder]
    assert run_files.checkpoints(stale, fetch=False) == [checkpoint] == run_files.checkpoints(run({}), fetch=False)
    assert run_files.checkpoints(run({contract.CHECKPOINT_DIR_TAG: str(run_folder)})) == [checkpoint]
    with pytest.raises(CheckpointError, match="not a checkpoint file name"):
        checkpoint_step(tmp_path / "model.pt")


def test_a_warm_start_begins_from_the_checkpoints_ema_weights_and_resumes_exactly(tmp_path):
    """init_from: step 0 with the given checkpoint's EMA weights, a fresh optimizer; a crash after
    a checkpoint resumes from the run's own checkpoint (init_from is not read again), bit for bit;
    a missing or mismatched checkpoint is one CheckpointError."""
    from ddpm.checkpoint import ema_weights, load_checkpoint
    from trained_runs import TINY_DIFFUSION, TINY_MODEL, tiny_checkpoint

    parent = tiny_checkpoint(tmp_path / "parent", steps=3)
    config = TrainConfig(steps=4, batch_size=4, warmup_steps=1, log_every=1, checkpoint_every=2, ema_decay=0.9,
                         device="cpu", init_from=str(parent))
    batches = lambda i: torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(100 + i)) * 2 - 1  # noqa: E731
    started = Trainer(TINY_MODEL, TINY_DIFFUSION, config, batches, tmp_path / "warm")
    started.warm_start(parent)
    inherited = ema_weights(load_checkpoint(parent))
    assert started.step == 0 and all(torch.equal(v, started.model.state_dict()[k]) for k, v in inherited.items())
    assert all(torch.equal(v, ema_weights({"ema": started.ema.state_dict()})[k]) for k, v in inherited.items())

    whole = Trainer(TINY_MODEL, TINY_DIFFUSION, config, batches, tmp_path / "whole").train(progress=False)
    crashed = Trainer(TINY_MODEL, TINY_DIFFUSION, config, batches, tmp_path / "split")
    crashed.train(progress=False, stop_at=2)
    resumed = Trainer(TINY_MODEL, TINY_DIFFUSION, config, batches, tmp_path / "split")
    result = resumed.train(progress=False)
    assert result.resumed_from == 2
    final_whole, final_split = load_checkpoint(whole.checkpoints[-1]), load_checkpoint(result.checkpoints[-1])
    assert all(torch.equal(v, final_split["ema"][k]) for k, v in final_whole["ema"].items())

    scratch = Trainer(TINY_MODEL, TINY_DIFFUSION, config.model_copy(update={"init_from": None}), batches,
                      tmp_path / "scratch").train(progress=False)
    assert not torch.equal(load_checkpoint(scratch.checkpoints[-1])["model"]["conv_out.weight"],
                           final_whole["model"]["conv_out.weight"])
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Trainer(TINY_MODEL, TINY_DIFFUSION, config.model_copy(update={"init_from": str(tmp_path / "gone.pt")}),
                batches, tmp_path / "gone").train(progress=False)
    other = TINY_DIFFUSION.model_copy(update={"num_timesteps": 50})
    with pytest.raises(CheckpointError, match="warm start from .*diffusion"):
        Trainer(TINY_MODEL, other, config, batches, tmp_path / "other").train(progress=False)


@pytest.mark.parametrize("content", [b"\x80\x02}q\x00.", b"PK\x03\x04 not a zip at all", b"garbage" * 50])
def test_a_forged_checkpoint_with_a_valid_checksum_is_refused_saying_what_it_is(tmp_path, content):
    """A file that matches its checksum but is no checkpoint: the reason was torch's unpickler state
    ("pop from empty list"); now it says the file is not one this project wrote."""
    import hashlib

    from ddpm.checkpoint import load_checkpoint

    forged = tmp_path / "step-0000001.pt"
    forged.write_bytes(content)
    (tmp_path / "step-0000001.pt.sha256").write_text(f"{hashlib.sha256(content).hexdigest()}  {forged.name}\n")
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(forged)
    message = str(raised.value)
    assert "\n" not in message and "not a torch checkpoint written by this project" in message
