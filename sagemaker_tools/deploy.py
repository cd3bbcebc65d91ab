"""The executor: deploy (create or blue/green update, smoke test, rollback), teardown and status."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagemaker_tools.autoscaling import (
    SavedAutoscaling,
    apply_autoscaling,
    read_autoscaling,
    remove_autoscaling,
    restore_autoscaling,
    scalable_target,
    scaling_policies,
)
from sagemaker_tools.aws import Clients, DeployError, as_deploy_error, aws_call, error_code, exists
from sagemaker_tools.config import ENDPOINT_TAG_KEY, PROJECT_TAG, SMOKE_CONTENT_TYPE, validate_endpoint_name
from sagemaker_tools.plan import DeployPlan

log = logging.getLogger(__name__)


@dataclass
class DeployResult:
    """What a deploy did; printed as JSON by the CLI."""

    endpoint_name: str
    endpoint_arn: str
    action: str  # created | updated | unchanged
    model_name: str
    endpoint_config_name: str
    model_data_url: str
    target_invocations: int | None
    min_instances: int
    max_instances: int
    smoke: dict[str, Any] | None = None
    deleted: list[str] = field(default_factory=list)


def _wait(clients: Clients, waiter: str, endpoint_name: str, waiter_config: dict[str, int]) -> None:
    from botocore.exceptions import BotoCoreError, WaiterError

    try:
        clients.sagemaker.get_waiter(waiter).wait(EndpointName=endpoint_name, WaiterConfig=waiter_config)
    except BotoCoreError as e:
        if not isinstance(e, WaiterError):
            raise as_deploy_error(f"waiting for {endpoint_name}", e) from e
        reason = ""
        desc = exists("describe_endpoint", clients.sagemaker.describe_endpoint, EndpointName=endpoint_name)
        if desc:
            reason = f" (status {desc.get('EndpointStatus')}: {desc.get('FailureReason', 'no reason given')})"
        raise DeployError(
            f"endpoint {endpoint_name} did not reach the expected state{reason}; check the container logs "
            f"in CloudWatch (/aws/sagemaker/Endpoints/{endpoint_name})"
        ) from e


def _has_our_tags(clients: Clients, arn: str, endpoint_name: str) -> bool:
    tags = aws_call("list_tags", clients.sagemaker.list_tags, ResourceArn=arn).get("Tags", [])
    kv = {t["Key"]: t["Value"] for t in tags}
    return kv.get(PROJECT_TAG["Key"]) == PROJECT_TAG["Value"] and kv.get(ENDPOINT_TAG_KEY) == endpoint_name


def ensure_artifact(plan: DeployPlan, clients: Clients) -> None:
    """Create the bucket if needed and upload the archive unless that exact version is already there."""
    from botocore.exceptions import ClientError

    bucket = plan.config.bucket
    try:
        found = exists("head_bucket", clients.s3.head_bucket, Bucket=bucket)
    except DeployError as e:
        if isinstance(e.__cause__, ClientError) and error_code(e.__cause__) in {"403", "AccessDenied"}:
            raise DeployError(
                f"bucket {bucket} exists but these credentials cannot use it (403): pass --bucket with a "
                "bucket in this account"
            ) from e
        raise
    if found is None:
        log.info("creating bucket s3://%s", bucket)
        aws_call("create_bucket", clients.s3.create_bucket, **plan.create_bucket_request())
    if exists("head_object", clients.s3.head_object, Bucket=bucket, Key=plan.s3_key) is not None:
        log.info("%s already uploaded", plan.model_data_url)
        return
    log.info("uploading %s (%d bytes)", plan.model_data_url, plan.package.path.stat().st_size)
    aws_call("upload_file", clients.s3.upload_file, **plan.upload_request())


def smoke_invoke(
    clients: Clients, endpoint_name: str, image: Path, classes: Sequence[int] | None = None
) -> dict[str, Any]:
    """POST a real image through SageMaker's runtime API; expect the server's V1 answer with a count."""
    body = image.read_bytes()
    resp = aws_call(
        "invoke_endpoint",
        clients.runtime.invoke_endpoint,
        EndpointName=endpoint_name,
        ContentType=SMOKE_CONTENT_TYPE,
        Accept="application/json",
        Body=body,
    )
    payload = resp["Body"].read()
    try:
        answer = json.loads(payload)
        count = answer["predictions"][0]["count"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
        raise DeployError(
            f"smoke test: endpoint {endpoint_name} answered {resp.get('ContentType')!r} without "
            f'{{"predictions": [{{"count": ...}}]}}: {payload[:200]!r}'
        ) from e
    if classes is not None and count not in classes:
        raise DeployError(
            f"smoke test: predicted count {count!r} is not one of the model's classes {classes}"
        )
    log.info("smoke test on %s: count %s", image.name, count)
    return {"image": str(image), "count": count, "response": answer}


def _current_variant(
    clients: Clients, endpoint: dict[str, Any], variant: str
) -> tuple[int | None, str | None]:
    """(desired instance count, instance type) of the variant the endpoint runs now."""
    count = None
    for v in endpoint.get("ProductionVariants", []):
        if v.get("VariantName") == variant:
            count = v.get("DesiredInstanceCount") or v.get("CurrentInstanceCount")
    cfg = exists(
        "describe_endpoint_config",
        clients.sagemaker.describe_endpoint_config,
        EndpointConfigName=endpoint["EndpointConfigName"],
    )
    itype = None
    for v in (cfg or {}).get("ProductionVariants", []):
        if v.get("VariantName") == variant:
            itype = v.get("InstanceType")
    return count, itype


def _models_of_config(clients: Clients, config_name: str) -> list[str]:
    cfg = exists(
        "describe_endpoint_config", clients.sagemaker.describe_endpoint_config, EndpointConfigName=config_name
    )
    return [v["ModelName"] for v in (cfg or {}).get("ProductionVariants", [])]


def _delete_config_and_models(
    clients: Clients, config_name: str, endpoint_name: str, keep_models: set[str]
) -> list[str]:
    """Delete a config we created and its models that nothing kept uses; never touch foreign resources."""
    deleted: list[str] = []
    cfg = exists(
        "describe_endpoint_config", clients.sagemaker.describe_endpoint_config, EndpointConfigName=config_name
    )
    if cfg is None:
        return deleted
    if not _has_our_tags(clients, cfg["EndpointConfigArn"], endpoint_name):
        log.warning("leaving endpoint config %s: it was not created by this tool", config_name)
        return deleted
    aws_call(
        "delete_endpoint_config", clients.sagemaker.delete_endpoint_config, EndpointConfigName=config_name
    )
    deleted.append(f"endpoint-config/{config_name}")
    for model in {v["ModelName"] for v in cfg.get("ProductionVariants", [])} - keep_models:
        desc = exists("describe_model", clients.sagemaker.describe_model, ModelName=model)
        if desc and _has_our_tags(clients, desc["ModelArn"], endpoint_name):
            aws_call("delete_model", clients.sagemaker.delete_model, ModelName=model)
            deleted.append(f"model/{model}")
    return deleted


def _existing_endpoint(plan: DeployPlan, clients: Clients) -> dict[str, Any] | None:
    """The endpoint if it exists, is ours and is InService (waiting out an update in progress)."""
    c = plan.config
    sm = clients.sagemaker
    endpoint = exists("describe_endpoint", sm.describe_endpoint, EndpointName=c.endpoint_name)
    if endpoint is None:
        return None
    if not _has_our_tags(clients, endpoint["EndpointArn"], c.endpoint_name):
        raise DeployError(
            f"endpoint {c.endpoint_name} exists but was not created by this tool (no "
            f"{PROJECT_TAG['Key']}={PROJECT_TAG['Value']} tag); choose another --endpoint-name"
        )
    if endpoint["EndpointStatus"] in {"Creating", "Updating", "SystemUpdating", "RollingBack"}:
        log.info("endpoint %s is %s; waiting for it first", c.endpoint_name, endpoint["EndpointStatus"])
        _wait(clients, "endpoint_in_service", c.endpoint_name, plan.waiter_config())
        endpoint = aws_call("describe_endpoint", sm.describe_endpoint, EndpointName=c.endpoint_name)
    if endpoint["EndpointStatus"] != "InService":
        raise DeployError(
            f"endpoint {c.endpoint_name} is {endpoint['EndpointStatus']} "
            f"({endpoint.get('FailureReason', 'no reason given')}): run `python -m sagemaker_tools.endpoint "
            f"teardown --endpoint-name {c.endpoint_name}` and deploy again"
        )
    return endpoint


def _prepare_update(
    plan: DeployPlan, clients: Clients, endpoint: dict[str, Any]
) -> tuple[int | None, SavedAutoscaling | None]:
    """Initial count for the new config; unblocks an instance-type change.

    Returns the count and, when the variant's autoscaling had to be removed, what it was (a rollback
    registers it again).
    """
    c = plan.config
    count, itype = _current_variant(clients, endpoint, c.variant_name)
    saved = None
    if itype and itype != c.instance_type:
        # Application Auto Scaling rejects an update that changes the instance type of a scaled variant.
        saved = read_autoscaling(clients, plan.resource_id)
        removed = remove_autoscaling(clients, plan.resource_id)
        if removed:
            log.info("instance type %s -> %s: removed %s before the update", itype, c.instance_type, removed)
    # start the new fleet at today's size (within min..max): an update must not drop capacity under load
    initial = max(c.min_instances, min(c.max_instances, int(count))) if count else None
    return initial, saved


def _rollback(
    plan: DeployPlan,
    clients: Clients,
    old_config: str,
    error: DeployError,
    saved_autoscaling: SavedAutoscaling | None = None,
) -> DeployError:
    """Point the endpoint back at ``old_config``, restore the autoscaling an instance-type change removed,
    and delete the new config/model; returns the error."""
    c = plan.config
    log.error("smoke test failed; rolling %s back to %s", c.endpoint_name, old_config)
    aws_call(
        "update_endpoint",
        clients.sagemaker.update_endpoint,
        EndpointName=c.endpoint_name,
        EndpointConfigName=old_config,
    )
    _wait(clients, "endpoint_in_service", c.endpoint_name, plan.waiter_config())
    message = f"{error}; rolled {c.endpoint_name} back to {old_config}"
    if saved_autoscaling is not None:
        try:
            restored = restore_autoscaling(clients, saved_autoscaling)
        except DeployError as e:
            log.error("could not restore the autoscaling of %s: %s", c.endpoint_name, e)
            message += (
                f" but could not restore its autoscaling ({e}): run "
                "`python -m sagemaker_tools.endpoint status` and deploy the previous version again"
            )
        else:
            log.info("restored %s", ", ".join(restored))
    keep = set(_models_of_config(clients, old_config))
    _delete_config_and_models(clients, plan.endpoint_config_name, c.endpoint_name, keep)
    return DeployError(message)


def deploy(plan: DeployPlan, clients: Clients) -> DeployResult:
    """Upload, create or update the endpoint, smoke-test it, autoscale it, then delete the old version.

    The old config and model are deleted only after the new version answered the smoke test; if it
    does not, the endpoint goes back to the old config (exit 1) and the new one is deleted.
    """
    c = plan.config
    sm = clients.sagemaker
    endpoint = _existing_endpoint(plan, clients)
    ensure_artifact(plan, clients)
    if exists("describe_model", sm.describe_model, ModelName=plan.model_name) is None:
        log.info("creating model %s (%s)", plan.model_name, c.image_uri)
        aws_call("create_model", sm.create_model, **plan.model_request())
    initial, saved_autoscaling = _prepare_update(plan, clients, endpoint) if endpoint else (None, None)
    config_name = plan.endpoint_config_name
    if (
        exists("describe_endpoint_config", sm.describe_endpoint_config, EndpointConfigName=config_name)
        is None
    ):
        aws_call("create_endpoint_config", sm.create_endpoint_config, **plan.endpoint_config_request(initial))

    old_config = endpoint["EndpointConfigName"] if endpoint else None
    if endpoint is None:
        action = "created"
        log.info("creating endpoint %s on %s", c.endpoint_name, config_name)
        aws_call("create_endpoint", sm.create_endpoint, **plan.create_endpoint_request())
    elif old_config == config_name:
        action, old_config = "unchanged", None
        log.info("endpoint %s already runs %s", c.endpoint_name, config_name)
    else:
        action = "updated"
        log.info("updating endpoint %s: %s -> %s", c.endpoint_name, old_config, config_name)
        aws_call("update_endpoint", sm.update_endpoint, **plan.update_endpoint_request())
    _wait(clients, "endpoint_in_service", c.endpoint_name, plan.waiter_config())
    endpoint = aws_call("describe_endpoint", sm.describe_endpoint, EndpointName=c.endpoint_name)

    smoke = None
    if c.smoke_image is None:
        log.info("no --smoke-image: skipping the smoke invocation")
    else:
        try:
            smoke = smoke_invoke(clients, c.endpoint_name, c.smoke_image, plan.package.spec.classes)
        except DeployError as e:
            if old_config is None:
                raise DeployError(f"{e}; the endpoint is up but unhealthy: fix it and deploy again") from e
            raise _rollback(plan, clients, old_config, e, saved_autoscaling) from e

    apply_autoscaling(plan, clients)
    deleted: list[str] = []
    if old_config:
        deleted = _delete_config_and_models(clients, old_config, c.endpoint_name, {plan.model_name})
    return DeployResult(
        endpoint_name=c.endpoint_name,
        endpoint_arn=endpoint["EndpointArn"],
        action=action,
        model_name=plan.model_name,
        endpoint_config_name=config_name,
        model_data_url=plan.model_data_url,
        target_invocations=c.target_invocations,
        min_instances=c.min_instances,
        max_instances=c.max_instances,
        smoke=smoke,
        deleted=deleted,
    )


# --------------------------------------------------------------------------------------------------
# Teardown and status
# --------------------------------------------------------------------------------------------------


def _paginate(clients: Clients, operation: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        for page in clients.sagemaker.get_paginator(operation).paginate(**params):
            yield from page.get(key, [])
    except (ClientError, BotoCoreError) as e:
        raise as_deploy_error(operation, e) from e


def teardown(
    endpoint_name: str, clients: Clients, *, wait_delay: int = 15, wait_attempts: int = 80
) -> list[str]:
    """Delete policy, scalable target, endpoint, then every config and model this tool tagged for it.

    Idempotent: on a clean account it deletes nothing and returns an empty list. The S3 archives stay
    (they are the model versions; a bucket lifecycle rule is the place to expire them).
    """
    validate_endpoint_name(endpoint_name)
    sm = clients.sagemaker
    deleted: list[str] = []
    endpoint = exists("describe_endpoint", sm.describe_endpoint, EndpointName=endpoint_name)
    if endpoint is not None and not _has_our_tags(clients, endpoint["EndpointArn"], endpoint_name):
        raise DeployError(f"endpoint {endpoint_name} was not created by this tool; refusing to delete it")

    prefix = f"endpoint/{endpoint_name}/variant/"
    targets = aws_call(
        "describe_scalable_targets",
        clients.autoscaling.describe_scalable_targets,
        ServiceNamespace="sagemaker",
    ).get("ScalableTargets", [])
    for rid in sorted({t["ResourceId"] for t in targets if t["ResourceId"].startswith(prefix)}):
        deleted += remove_autoscaling(clients, rid)

    if endpoint is not None:
        aws_call("delete_endpoint", sm.delete_endpoint, EndpointName=endpoint_name)
        deleted.append(f"endpoint/{endpoint_name}")
        _wait(clients, "endpoint_deleted", endpoint_name, {"Delay": wait_delay, "MaxAttempts": wait_attempts})

    name_prefix = f"{endpoint_name}-"
    for cfg in list(_paginate(clients, "list_endpoint_configs", "EndpointConfigs", NameContains=name_prefix)):
        name = cfg["EndpointConfigName"]
        if name.startswith(name_prefix) and _has_our_tags(clients, cfg["EndpointConfigArn"], endpoint_name):
            aws_call("delete_endpoint_config", sm.delete_endpoint_config, EndpointConfigName=name)
            deleted.append(f"endpoint-config/{name}")
    for model in list(_paginate(clients, "list_models", "Models", NameContains=name_prefix)):
        name = model["ModelName"]
        if name.startswith(name_prefix) and _has_our_tags(clients, model["ModelArn"], endpoint_name):
            aws_call("delete_model", sm.delete_model, ModelName=name)
            deleted.append(f"model/{name}")
    return deleted


def status(endpoint_name: str, clients: Clients) -> dict[str, Any] | None:
    """The endpoint, its config, instance counts, scalable target and policy; None if it does not exist."""
    sm = clients.sagemaker
    endpoint = exists("describe_endpoint", sm.describe_endpoint, EndpointName=endpoint_name)
    if endpoint is None:
        return None
    cfg = (
        exists(
            "describe_endpoint_config",
            sm.describe_endpoint_config,
            EndpointConfigName=endpoint["EndpointConfigName"],
        )
        or {}
    )
    types = {v["VariantName"]: v.get("InstanceType") for v in cfg.get("ProductionVariants", [])}
    models = {v["VariantName"]: v.get("ModelName") for v in cfg.get("ProductionVariants", [])}
    variants = []
    for v in endpoint.get("ProductionVariants", []):
        name = v["VariantName"]
        rid = f"endpoint/{endpoint_name}/variant/{name}"
        target = scalable_target(clients, rid)
        policy = next(iter(scaling_policies(clients, rid)), None)
        tt = (policy or {}).get("TargetTrackingScalingPolicyConfiguration", {})
        variants.append(
            {
                "variant": name,
                "model": models.get(name),
                "instance_type": types.get(name),
                "current_instances": v.get("CurrentInstanceCount"),
                "desired_instances": v.get("DesiredInstanceCount"),
                "min": target["MinCapacity"] if target else None,
                "max": target["MaxCapacity"] if target else None,
                "policy": policy["PolicyName"] if policy else None,
                "target_invocations": tt.get("TargetValue"),
                "scale_in_cooldown": tt.get("ScaleInCooldown"),
                "scale_out_cooldown": tt.get("ScaleOutCooldown"),
            }
        )
    return {
        "endpoint": endpoint_name,
        "status": endpoint["EndpointStatus"],
        "endpoint_config": endpoint["EndpointConfigName"],
        "variants": variants,
    }
