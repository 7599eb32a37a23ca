"""Pipeline overhead and data stall: the train_pipeline flow against the bare loop doing the same work.

bare: the same prepared data, model, recipe and steps through Trainer.train_step with no
checkpoints, logging or orchestration, then the same samples and the same FID. The time spent in
the batch function is timed separately: its share of the step time is the data stall.
flow: `train_pipeline` with the same defaults, on a temporary Prefect server (started once,
timed on its own with an empty flow) and a fresh sqlite MLflow store, everything on.
Both use the cached classifier and reference statistics, computed once before either.

    python benchmarks/pipeline_overhead.py [--rounds 1] [--steps 1500]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

home = Path(tempfile.mkdtemp(prefix="ddpm-overhead-"))
os.environ["DDPM_HOME"] = str(home)                        # before tasks reads its settings
os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))

from common import machine  # noqa: E402  (puts the checkout on sys.path)

from prefect import flow  # noqa: E402

from ddpm.data import BatchLoader, DataConfig, load_prepared, prepare_dataset  # noqa: E402
from ddpm.images import to_uint8  # noqa: E402
from ddpm.metrics.scoring import Scorer  # noqa: E402
from ddpm.samplers import generate  # noqa: E402
from ddpm.training import Trainer  # noqa: E402
from flows.train_pipeline import train_pipeline  # noqa: E402
from tasks.config import DEFAULTS  # noqa: E402
from tasks.settings import metrics_cache_dir  # noqa: E402


def bare(dataset, train_config, scorer: Scorer) -> dict:
    """Train, sample, score: the work of the flow and nothing else. Times the batch function apart."""
    loader = BatchLoader(dataset.split("train")[0], train_config.batch_size, seed=train_config.seed,
                         hflip=train_config.hflip)
    waited = 0.0

    def batch_fn(index):
        nonlocal waited
        start = time.perf_counter()
        batch = loader.batch(index)
        waited += time.perf_counter() - start
        return batch

    start = time.perf_counter()
    trainer = Trainer(DEFAULTS.model, DEFAULTS.diffusion, train_config, batch_fn)
    while trainer.step < train_config.steps:
        trainer.train_step()
    trained = time.perf_counter()
    sampler = DEFAULTS.sampling.build(trainer.schedule)
    model = trainer.ema.module.eval()
    images = to_uint8(generate(model, sampler, DEFAULTS.sampling.num_images, DEFAULTS.sampling.seed,
                               DEFAULTS.sampling.batch_size))
    fid = scorer.fid(images)
    end = time.perf_counter()
    return {"total": end - start, "train": trained - start, "data_wait": waited, "fid": fid}

@flow
def empty_flow() -> None:
    """Nothing: its first call measures the temporary server's start and a flow run's fixed cost."""

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=DEFAULTS.train.steps)
    args = parser.parse_args()
    train_config = DEFAULTS.train.model_copy(update={"steps": args.steps})
    print(machine())

    dataset = load_prepared(prepare_dataset(DataConfig(), home / "data"))
    scorer = Scorer.build(dataset, ["classifier"], metrics_cache_dir())   # the flow's fid_classifier, as it scores

    start = time.perf_counter()
    empty_flow()
    server_start = time.perf_counter() - start
    start = time.perf_counter()
    empty_flow()
    empty_run = time.perf_counter() - start

    bares, flows = [], []
    for _ in range(args.rounds):
        bares.append(bare(dataset, train_config, scorer))
        start = time.perf_counter()
        train_pipeline(train=train_config)
        flows.append(time.perf_counter() - start)
        print(f"  round: bare {bares[-1]['total']:.1f} s, flow {flows[-1]:.1f} s", flush=True)

    bare_total = statistics.median(b["total"] for b in bares)
    bare_train = statistics.median(b["train"] for b in bares)
    stall = statistics.median(b["data_wait"] / b["train"] for b in bares)
    flow_total = statistics.median(flows)
    print(f"\n{'what':<52}{'seconds':>9}")
    print(f"{'temporary Prefect server start (first empty flow)':<52}{server_start:>9.1f}")
    print(f"{'an empty flow run on the running server':<52}{empty_run:>9.2f}")
    print(f"{'bare: train ' + str(args.steps) + ' steps':<52}{bare_train:>9.1f}")
    print(f"{'bare: train + sample + FID':<52}{bare_total:>9.1f}")
    print(f"{'flow: train_pipeline, server already up':<52}{flow_total:>9.1f}")
    print(f"\npipeline overhead (flow / bare - 1): {100 * (flow_total / bare_total - 1):+.1f}% "
          f"({100 * ((flow_total + server_start) / bare_total - 1):+.1f}% counting the server start)")
    print(f"data stall (batch function / train time, bare loop): {100 * stall:.2f}%")

if __name__ == "__main__":
    main()
