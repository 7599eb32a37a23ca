"""promote: register the best run by its metric (FID unless --metric names another) and make it the
`champion` when it beats the current one.

    python -m flows.promote                       # experiment "ddpm", registered model "ddpm"

Other flows (retrain, compare_schedules) call `promote_best(...)` from tasks.registry directly,
or this flow as a subflow. The rule itself lives in tasks.registry.promote_best.
"""

from __future__ import annotations

import json
import sys

from prefect import flow
from pydantic import Field

from tasks import contract
from tasks.registry import ChallengeRule, promote_best


class PromoteConfig(ChallengeRule):
    """What to promote: which experiments to search, into which registered model, and by which
    rule the challenger must beat the champion (ChallengeRule: seeds, confidence, min_margin)."""

    experiments: list[str] = Field([contract.DEFAULT_EXPERIMENT], min_length=1, description="MLflow experiments whose runs compete")
    model_name: str = Field(contract.DEFAULT_MODEL_NAME, min_length=1, description="registered model name")
    fingerprint: str | None = Field(None, description="dataset fingerprint; default: that of the newest run with an FID")
    metric: str | None = Field(None, description="the metric runs are ranked by, in its direction: fid_inception, "
                                                  "kid_inception, precision_inception, ... (<measure>_<features>); "
                                                  "default: that of the newest run")
    max_images: int = Field(64, ge=1, le=1024, description="largest num_images one serving request may ask for")
    conditional: bool | None = Field(None, description="promote class-conditional models (True) or unconditional "
                                                        "ones (False); default: the kind of the newest run")


@flow(name="promote", log_prints=True)
def promote(config: PromoteConfig = PromoteConfig()) -> dict:
    """Register the best run of `config.experiments` by FID; move `champion` only if it beats the
    champion head-to-head by more than the noise margin."""
    return promote_best(config.experiments, config.model_name, config.fingerprint, config.metric,
                        max_images=config.max_images, conditional=config.conditional,
                        rule=ChallengeRule(**config.model_dump(include=set(ChallengeRule.model_fields))))


if __name__ == "__main__":
    from flows.prefect_server import prefect_api

    with prefect_api():
        result = promote()
    print(json.dumps(result, indent=1))
    sys.exit(0)
