"""The fields of KubeRay's RayCluster custom resource (ray.io/v1), as a strict JSON Schema.

kubernetes-validate knows only the core API, so the RayCluster the chart renders is checked
here: every field must be one the v1 API defines (a misspelt key would be dropped silently
by the API server, or rejected by a strict one), and the fields the CRD requires must be
present. The embedded pod templates are core objects and are validated separately.

Field list: ray-operator/apis/ray/v1/raycluster_types.go (RayClusterSpec, HeadGroupSpec,
WorkerGroupSpec, AutoscalerOptions, ScaleStrategy), KubeRay 1.1 through 1.5. rayStartParams,
minReplicas and maxReplicas are listed as required because the CRDs of the older releases
in that range require them.
"""

from __future__ import annotations

from typing import Any

import jsonschema

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_OBJECT = {"type": "object"}  # a core type (PodTemplateSpec, Service, ...) checked elsewhere
_OBJECTS = {"type": "array", "items": _OBJECT}

_AUTOSCALER_OPTIONS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "resources": _OBJECT,
        "image": {"type": "string"},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "securityContext": _OBJECT,
        "idleTimeoutSeconds": _INT32,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]},
        "env": _OBJECTS,
        "envFrom": _OBJECTS,
        "volumeMounts": _OBJECTS,
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
    },
}

_HEAD_GROUP_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["rayStartParams", "template"],
    "properties": {
        "template": _OBJECT,
        "headService": _OBJECT,
        "enableIngress": {"type": "boolean"},
        "ingressOptions": _OBJECT,
        "resources": _STRING_MAP,
        "labels": _STRING_MAP,
        "rayStartParams": _STRING_MAP,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
    },
}

_WORKER_GROUP_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "properties": {
        "suspend": {"type": "boolean"},
        "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "replicas": _INT32,
        "minReplicas": _INT32,
        "maxReplicas": _INT32,
        "idleTimeoutSeconds": _INT32,
        "priority": {"type": "integer"},
        "resources": _STRING_MAP,
        "labels": _STRING_MAP,
        "rayStartParams": _STRING_MAP,
        "template": _OBJECT,
        "scaleStrategy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}},
        },
        "numOfHosts": {"type": "integer", "minimum": 1},
    },
}

RAYCLUSTER_V1_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "labels": _STRING_MAP,
                "annotations": _STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["headGroupSpec"],
            "properties": {
                "headGroupSpec": _HEAD_GROUP_SPEC,
                "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP_SPEC},
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": _AUTOSCALER_OPTIONS,
                "headServiceAnnotations": _STRING_MAP,
                "suspend": {"type": "boolean"},
                "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
                "gcsFaultToleranceOptions": _OBJECT,
                "upgradeStrategy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"type": {"enum": ["Recreate", "None"]}},
                },
                "authOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "enableK8sTokenAuth": {"type": "boolean"},
                        "secretName": {"type": "string"},
                        "mode": {"enum": ["disabled", "token"]},
                    },
                },
                "historyServerOptions": _OBJECT,
                "networkPolicy": _OBJECT,
                "tlsOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"enabled": {"type": "boolean"}},
                },
            },
        },
    },
}


def raycluster_errors(obj: dict[str, Any]) -> list[str]:
    """Every violation of the v1 field list and of the rules the operator enforces itself."""
    validator = jsonschema.Draft202012Validator(RAYCLUSTER_V1_SCHEMA)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]
    if errors:
        return errors
    groups = obj["spec"].get("workerGroupSpecs", [])
    names = [group["groupName"] for group in groups]
    if len(names) != len(set(names)):
        errors.append(f"workerGroupSpecs: duplicate groupName in {names}")
    for group in groups:
        low, high = group["minReplicas"], group["maxReplicas"]
        replicas = group.get("replicas", low)
        if not low <= replicas <= high:
            errors.append(f"{group['groupName']}: need minReplicas <= replicas <= maxReplicas, got {low}, {replicas}, {high}")
    return errors


def pod_templates(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod templates of a RayCluster by group ("head" for the head group)."""
    spec = obj["spec"]
    templates = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        templates[group["groupName"]] = group["template"]
    return templates
