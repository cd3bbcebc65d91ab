"""Application Auto Scaling for an endpoint variant: register, put the target-tracking policy,
read, remove and restore (a rollback re-registers what an instance-type change removed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sagemaker_tools.aws import Clients, aws_call
from sagemaker_tools.config import SCALABLE_DIMENSION
from sagemaker_tools.plan import DeployPlan, target_key

log = logging.getLogger(__name__)


def scalable_target(clients: Clients, resource_id: str) -> dict[str, Any] | None:
    """The variant's registered scalable target, or None."""
    targets = aws_call(
        "describe_scalable_targets",
        clients.autoscaling.describe_scalable_targets,
        ServiceNamespace="sagemaker",
        ResourceIds=[resource_id],
        ScalableDimension=SCALABLE_DIMENSION,
    ).get("ScalableTargets", [])
    return next((t for t in targets if t["ResourceId"] == resource_id), None)


def scaling_policies(clients: Clients, resource_id: str) -> list[dict[str, Any]]:
    """The variant's scaling policies (the API may return others' too: they are filtered out)."""
    policies = aws_call(
        "describe_scaling_policies",
        clients.autoscaling.describe_scaling_policies,
        ServiceNamespace="sagemaker",
        ResourceId=resource_id,
        ScalableDimension=SCALABLE_DIMENSION,
    ).get("ScalingPolicies", [])
    return [p for p in policies if p["ResourceId"] == resource_id]


def remove_autoscaling(clients: Clients, resource_id: str) -> list[str]:
    """Delete the variant's policies and deregister it (Application Auto Scaling keeps them otherwise)."""
    removed: list[str] = []
    key = target_key(resource_id)
    for p in scaling_policies(clients, resource_id):
        aws_call(
            "delete_scaling_policy",
            clients.autoscaling.delete_scaling_policy,
            PolicyName=p["PolicyName"],
            **key,
        )
        removed.append(f"scaling-policy/{p['PolicyName']}")
    if scalable_target(clients, resource_id) is not None:
        aws_call("deregister_scalable_target", clients.autoscaling.deregister_scalable_target, **key)
        removed.append(f"scalable-target/{resource_id}")
    return removed


@dataclass(frozen=True)
class SavedAutoscaling:
    """A variant's scalable target and policies as described, to re-register them after a rollback."""

    target: dict[str, Any]
    policies: tuple[dict[str, Any], ...]


#: Fields of a described policy that PutScalingPolicy accepts back (besides the target key and name).
_POLICY_FIELDS = ("PolicyType", "TargetTrackingScalingPolicyConfiguration", "StepScalingPolicyConfiguration")


def read_autoscaling(clients: Clients, resource_id: str) -> SavedAutoscaling | None:
    """The variant's scalable target and its policies, or None when it is not registered."""
    target = scalable_target(clients, resource_id)
    if target is None:
        return None
    return SavedAutoscaling(target=target, policies=tuple(scaling_policies(clients, resource_id)))


def restore_autoscaling(clients: Clients, saved: SavedAutoscaling) -> list[str]:
    """Register the saved target (min/max, suspended state) and put its policies back, as they were."""
    t = saved.target
    key = target_key(t["ResourceId"])
    target_params: dict[str, Any] = {**key, "MinCapacity": t["MinCapacity"], "MaxCapacity": t["MaxCapacity"]}
    if t.get("SuspendedState"):
        target_params["SuspendedState"] = t["SuspendedState"]
    aws_call("register_scalable_target", clients.autoscaling.register_scalable_target, **target_params)
    restored = [f"scalable-target/{t['ResourceId']}"]
    for p in saved.policies:
        params = {k: p[k] for k in _POLICY_FIELDS if k in p}
        aws_call(
            "put_scaling_policy",
            clients.autoscaling.put_scaling_policy,
            PolicyName=p["PolicyName"],
            **key,
            **params,
        )
        restored.append(f"scaling-policy/{p['PolicyName']}")
    return restored


def apply_autoscaling(plan: DeployPlan, clients: Clients) -> None:
    """Register min/max and (re)put the target-tracking policy; both calls are upserts."""
    if plan.config.target_invocations is None:
        removed = remove_autoscaling(clients, plan.resource_id)
        if removed:
            log.info("autoscaling disabled: removed %s", ", ".join(removed))
        return
    aws_call(
        "register_scalable_target",
        clients.autoscaling.register_scalable_target,
        **plan.scalable_target_request(),
    )
    aws_call("put_scaling_policy", clients.autoscaling.put_scaling_policy, **plan.scaling_policy_request())
    log.info(
        "autoscaling %s: %d..%d instances, target %d invocations/instance/minute",
        plan.resource_id,
        plan.config.min_instances,
        plan.config.max_instances,
        plan.config.target_invocations,
    )
