"""The requests of one deploy, built by pure functions (:class:`DeployPlan`): what ``--dry-run``
prints and what :mod:`sagemaker_tools.deploy` executes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sagemaker_tools.config import (
    ENDPOINT_TAG_KEY,
    PROJECT_TAG,
    SCALABLE_DIMENSION,
    SCALING_METRIC,
    SMOKE_CONTENT_TYPE,
    DeployConfig,
)
from sagemaker_tools.package import PackagedModel


@dataclass(frozen=True)
class Call:
    """One AWS API call: what ``--dry-run`` prints and what the executor runs."""

    service: str
    operation: str
    params: dict[str, Any]
    when: str | None = None

    def to_json(self) -> str:
        """One JSON line (``when`` only for calls that depend on what already exists)."""
        d: dict[str, Any] = {"service": self.service, "operation": self.operation, "params": self.params}
        if self.when:
            d["when"] = self.when
        return json.dumps(d, sort_keys=False, default=str)


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _tags(endpoint_name: str) -> list[dict[str, str]]:
    return [dict(PROJECT_TAG), {"Key": ENDPOINT_TAG_KEY, "Value": endpoint_name}]


@dataclass(frozen=True)
class DeployPlan:
    """Names and request bodies of one deploy; no AWS state is read to build it."""

    config: DeployConfig
    package: PackagedModel

    @property
    def s3_key(self) -> str:
        """Content-addressed key: one object per model version, never overwritten."""
        return f"{self.package.spec.name}/{self.package.version}/model.tar.gz"

    @property
    def model_data_url(self) -> str:
        """Where SageMaker downloads the archive from before extracting it into /opt/ml/model."""
        return f"s3://{self.config.bucket}/{self.s3_key}"

    @property
    def environment(self) -> dict[str, str]:
        """Container environment: model identity for logs/metrics, plus the user's --env values."""
        return {
            "MODEL_NAME": self.package.spec.name,
            "MODEL_VERSION": self.package.version,
            **self.config.environment,
        }

    @property
    def model_name(self) -> str:
        """Unique per (archive, image, role, env): a changed input makes a new Model."""
        c = self.config
        key = [self.package.sha256, c.image_uri, c.role_arn, self.environment]
        return f"{c.endpoint_name}-{_short_hash(key)}"

    @property
    def endpoint_config_name(self) -> str:
        """Unique per (model, instance type, variant); the instance count is not part of it."""
        c = self.config
        return f"{c.endpoint_name}-{_short_hash([self.model_name, c.instance_type, c.variant_name])}"

    @property
    def resource_id(self) -> str:
        """Application Auto Scaling's id for the variant."""
        return f"endpoint/{self.config.endpoint_name}/variant/{self.config.variant_name}"

    @property
    def policy_name(self) -> str:
        """One target-tracking policy per endpoint; put_scaling_policy replaces it in place."""
        return f"{self.config.endpoint_name}-invocations-per-instance"

    def create_bucket_request(self) -> dict[str, Any]:
        """us-east-1 is the one region that rejects an explicit LocationConstraint."""
        params: dict[str, Any] = {"Bucket": self.config.bucket}
        if self.config.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
        return params

    def upload_request(self) -> dict[str, Any]:
        """Arguments of ``s3.upload_file`` (multipart for large models)."""
        return {
            "Filename": str(self.package.path),
            "Bucket": self.config.bucket,
            "Key": self.s3_key,
            "ExtraArgs": {"Metadata": {"sha256": self.package.sha256, "model-version": self.package.version}},
        }

    def model_request(self) -> dict[str, Any]:
        """CreateModel: the custom serving image answers /ping and /invocations on 8080 itself."""
        return {
            "ModelName": self.model_name,
            "ExecutionRoleArn": self.config.role_arn,
            "PrimaryContainer": {
                "Image": self.config.image_uri,
                "ModelDataUrl": self.model_data_url,
                "Environment": self.environment,
            },
            "Tags": _tags(self.config.endpoint_name),
        }

    def endpoint_config_request(self, initial_instance_count: int | None = None) -> dict[str, Any]:
        """CreateEndpointConfig: one variant; on update it starts at the endpoint's current count."""
        count = initial_instance_count or self.config.min_instances
        return {
            "EndpointConfigName": self.endpoint_config_name,
            "ProductionVariants": [
                {
                    "VariantName": self.config.variant_name,
                    "ModelName": self.model_name,
                    "InstanceType": self.config.instance_type,
                    "InitialInstanceCount": count,
                    "InitialVariantWeight": 1.0,
                }
            ],
            "Tags": _tags(self.config.endpoint_name),
        }

    def create_endpoint_request(self) -> dict[str, Any]:
        """CreateEndpoint (first deploy)."""
        return {
            "EndpointName": self.config.endpoint_name,
            "EndpointConfigName": self.endpoint_config_name,
            "Tags": _tags(self.config.endpoint_name),
        }

    def update_endpoint_request(self) -> dict[str, Any]:
        """UpdateEndpoint: SageMaker brings up the new fleet before it shifts traffic (no downtime)."""
        return {"EndpointName": self.config.endpoint_name, "EndpointConfigName": self.endpoint_config_name}

    def waiter_config(self) -> dict[str, int]:
        """Waiter pacing; 30 s x 120 by default (endpoint creation takes 5-10 minutes)."""
        return {"Delay": self.config.wait_delay, "MaxAttempts": self.config.wait_attempts}

    def scalable_target_request(self) -> dict[str, Any]:
        """RegisterScalableTarget: min/max instances for the variant (an upsert)."""
        return {
            "ServiceNamespace": "sagemaker",
            "ResourceId": self.resource_id,
            "ScalableDimension": SCALABLE_DIMENSION,
            "MinCapacity": self.config.min_instances,
            "MaxCapacity": self.config.max_instances,
        }

    def scaling_policy_request(self) -> dict[str, Any]:
        """PutScalingPolicy: target tracking on invocations per instance per minute."""
        if self.config.target_invocations is None:
            raise ValueError("autoscaling is disabled for this plan")
        return {
            "PolicyName": self.policy_name,
            "ServiceNamespace": "sagemaker",
            "ResourceId": self.resource_id,
            "ScalableDimension": SCALABLE_DIMENSION,
            "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": float(self.config.target_invocations),
                "PredefinedMetricSpecification": {"PredefinedMetricType": SCALING_METRIC},
                "ScaleInCooldown": self.config.scale_in_cooldown,
                "ScaleOutCooldown": self.config.scale_out_cooldown,
            },
        }

    def calls(self) -> list[Call]:
        """Every call a deploy may make, in order; ``when`` marks those that depend on existing state."""
        c = self.config
        ep = {"EndpointName": c.endpoint_name}
        calls = [
            Call("sagemaker", "describe_endpoint", ep),
            Call("sagemaker", "list_tags", {"ResourceArn": "<endpoint arn>"}, when="endpoint exists"),
            Call("s3", "head_bucket", {"Bucket": c.bucket}),
            Call("s3", "create_bucket", self.create_bucket_request(), when="bucket missing"),
            Call("s3", "head_object", {"Bucket": c.bucket, "Key": self.s3_key}),
            Call("s3", "upload_file", self.upload_request(), when="object missing"),
            Call("sagemaker", "describe_model", {"ModelName": self.model_name}),
            Call("sagemaker", "create_model", self.model_request(), when="model missing"),
            Call(
                "sagemaker",
                "create_endpoint_config",
                self.endpoint_config_request(),
                when="config missing; on update InitialInstanceCount = the variant's current desired count",
            ),
            Call("sagemaker", "create_endpoint", self.create_endpoint_request(), when="endpoint missing"),
            Call(
                "sagemaker",
                "update_endpoint",
                self.update_endpoint_request(),
                when="endpoint exists on another config",
            ),
            Call("sagemaker", "wait:endpoint_in_service", {**ep, "WaiterConfig": self.waiter_config()}),
        ]
        if c.smoke_image is not None:
            calls.append(
                Call(
                    "sagemaker-runtime",
                    "invoke_endpoint",
                    {
                        **ep,
                        "ContentType": SMOKE_CONTENT_TYPE,
                        "Accept": "application/json",
                        "Body": f"<{c.smoke_image}>",
                    },
                )
            )
        if c.target_invocations is not None:
            calls += [
                Call("application-autoscaling", "register_scalable_target", self.scalable_target_request()),
                Call("application-autoscaling", "put_scaling_policy", self.scaling_policy_request()),
            ]
        else:
            calls.append(
                Call(
                    "application-autoscaling",
                    "deregister_scalable_target",
                    target_key(self.resource_id),
                    when="autoscaling disabled and a scalable target exists",
                )
            )
        calls += [
            Call(
                "sagemaker",
                "delete_endpoint_config",
                {"EndpointConfigName": "<previous config>"},
                when="endpoint was updated",
            ),
            Call(
                "sagemaker",
                "delete_model",
                {"ModelName": "<previous model>"},
                when="endpoint was updated and the previous model is no longer used",
            ),
        ]
        return calls


def target_key(resource_id: str) -> dict[str, str]:
    return {
        "ServiceNamespace": "sagemaker",
        "ResourceId": resource_id,
        "ScalableDimension": SCALABLE_DIMENSION,
    }
