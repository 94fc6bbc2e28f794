"""The files in cluster/ are what Kubernetes, KubeRay and Ray's cluster launcher accept, sized to the config.

Every schema comes from an installed package or the shared data beside the repo; none is written here and nothing
is downloaded:
- the RayJob and RayCluster whole: KubeRay v1.7.0's own CRDs (../shared/data/kuberay-crd/), their stored version's
  openAPIV3Schema turned into JSON Schema, strictly (an unknown field is an error, as `kubectl --validate=strict`);
- pod templates, the teacher's Deployment and Service: Kubernetes' own API schemas as JSON Schema, in their strict
  form (an unknown field is an error, as the API server's structural schemas make it), from kubernetes-validate;
- the RayCluster spec (standalone and inside the RayJob): read by Ray's own KubeRay code, the autoscaler's
  translation of a RayCluster into node types, which checks its result against Ray's cluster schema;
- the cluster-launcher YAML: ray/autoscaler/ray-schema.json from the ray wheel, and each EC2 node_config against
  botocore's model of the RunInstances request.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from conftest import SHARED_DATA
from referencing import Registry, Resource

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERNETES_VERSION = "1.33"          # a version every current managed Kubernetes offers
IMAGE_CONFIGS = "/app/configs/"      # where cluster/Dockerfile puts configs/
SECRET_WORDS = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def rayjob() -> dict:
    (job,) = documents("rayjob.yaml")
    return job


def raycluster() -> dict:
    (cluster,) = documents("raycluster.yaml")
    return cluster


def cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": raycluster()["spec"], "rayjob.yaml": rayjob()["spec"]["rayClusterSpec"]}


def pod_templates() -> dict[str, dict]:
    """Every pod template of the KubeRay manifests, by where it is."""
    found = {}
    for name, spec in cluster_specs().items():
        found[f"{name}: head"] = spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            found[f"{name}: worker group {group['groupName']}"] = group["template"]
    found["rayjob.yaml: submitter"] = rayjob()["spec"]["submitterPodTemplate"]
    return found


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec["containers"] + spec.get("initContainers", [])


# --- Kubernetes' own schemas -------------------------------------------------------------------------------

def kubernetes_schema(name: str) -> jsonschema.Validator:
    """A strict validator for one Kubernetes type (e.g. 'podtemplatespec-v1'), as kubernetes-validate builds it."""
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}.0-local-strict"
    schema = json.loads((folder / f"{name}.json").read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def schema_errors(validator: jsonschema.Validator, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


@pytest.mark.parametrize("where", sorted(pod_templates()))
def test_every_kuberay_pod_template_is_a_valid_kubernetes_pod_template(where):
    assert schema_errors(kubernetes_schema("podtemplatespec-v1"), pod_templates()[where]) == []


def test_the_teacher_deployment_and_service_are_valid_kubernetes_objects():
    import kubernetes_validate

    kinds = []
    for document in documents("teacher-vllm.yaml"):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        kinds.append(document["kind"])
    assert kinds == ["Deployment", "Service"]


# --- KubeRay's own CRDs ------------------------------------------------------------------------------------

KUBERAY_CRDS = SHARED_DATA / "kuberay-crd"


def strict_json_schema(node):
    """A CRD's structural OpenAPI v3 schema as JSON Schema, strict as the API server with strict field validation:
    an object that lists its properties admits no other field unless it says x-kubernetes-preserve-unknown-fields;
    int-or-string takes either; nullable admits null. CEL rules (x-kubernetes-validations) are not evaluated."""
    if isinstance(node, list):
        return [strict_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: strict_json_schema(value) for key, value in node.items()
              if key not in ("nullable", "x-kubernetes-int-or-string")}
    if node.get("x-kubernetes-int-or-string"):
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


@functools.lru_cache(maxsize=None)
def kuberay_validator(kind: str) -> tuple[str, jsonschema.Validator]:
    """(apiVersion, validator) of the CRD's storage version for `kind` (RayJob, RayCluster)."""
    crd = yaml.load((KUBERAY_CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=yaml.CSafeLoader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema = strict_json_schema(version["schema"]["openAPIV3Schema"])
    return f"{crd['spec']['group']}/{version['name']}", jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name, kind", [("rayjob.yaml", "RayJob"), ("raycluster.yaml", "RayCluster")])
def test_the_kuberay_manifests_pass_kuberays_own_crd_strictly(name, kind):
    (document,) = documents(name)
    api_version, validator = kuberay_validator(kind)
    assert (document["apiVersion"], document["kind"]) == (api_version, kind)
    assert schema_errors(validator, document) == []


@pytest.mark.parametrize("mistake, error", [
    (lambda job: job["spec"].__setitem__("shutdownAfterJobFinish", job["spec"].pop("shutdownAfterJobFinishes")),
     "spec: Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)"),
    (lambda job: job["spec"]["rayClusterSpec"]["headGroupSpec"].__setitem__("rayStartParam", {}),
     "spec/rayClusterSpec/headGroupSpec: Additional properties are not allowed ('rayStartParam' was unexpected)"),
    (lambda job: job["spec"].__setitem__("entrypoint", ["tapir", "run"]),
     "spec/entrypoint: ['tapir', 'run'] is not of type 'string'"),
    (lambda job: job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", "two"),
     "spec/rayClusterSpec/workerGroupSpecs/0/replicas: 'two' is not of type 'integer'"),
])
def test_a_mistake_in_a_kuberay_only_field_is_rejected_by_the_crd(mistake, error):
    job = copy.deepcopy(rayjob())
    mistake(job)
    assert error in schema_errors(kuberay_validator("RayJob")[1], job)


def test_the_crd_conversion_is_strict_only_where_kubernetes_is():
    schema = strict_json_schema({"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True}, "labels": {"type": "object", "additionalProperties": {
            "type": "string"}}, "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                                         "properties": {"a": {"type": "string"}}}}})
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"port": 8265, "labels": {"any": "x"}, "free": {"a": "b", "extra": 1}})
    assert validator.is_valid({"port": "http"}) and not validator.is_valid({"prot": 1})


def worker_template() -> dict:
    return copy.deepcopy(cluster_specs()["rayjob.yaml"]["workerGroupSpecs"][0]["template"])


@pytest.mark.parametrize("mistake, field", [
    (lambda t: t["spec"]["containers"][0].__setitem__("resource", t["spec"]["containers"][0].pop("resources")),
     "resource"),
    (lambda t: t["spec"].__setitem__("nodeSelecter", {"node.kubernetes.io/instance-type": "p5.48xlarge"}),
     "nodeSelecter"),
    (lambda t: t["spec"]["containers"][0]["env"][0]["valueFrom"].__setitem__(
        "secretRef", t["spec"]["containers"][0]["env"][0]["valueFrom"].pop("secretKeyRef")), "secretRef"),
])
def test_a_misspelled_field_in_a_pod_template_is_rejected(mistake, field):
    template = worker_template()
    mistake(template)
    errors = schema_errors(kubernetes_schema("podtemplatespec-v1"), template)
    assert any(field in error and "Additional properties" in error for error in errors), errors


@pytest.mark.parametrize("mistake", [
    lambda t: t["spec"]["containers"][0].__setitem__("ports", [{"containerPort": "8265"}]),
    lambda t: t["spec"]["containers"][0].__setitem__("env", {"HF_HOME": "/mnt/local-nvme/hf"}),
    lambda t: t["spec"]["containers"][0]["resources"]["limits"].__setitem__("memory", ["900Gi"]),
    lambda t: t["spec"]["tolerations"][0].__setitem__("tolerationSeconds", "forever"),
])
def test_a_value_of_the_wrong_type_in_a_pod_template_is_rejected(mistake):
    template = worker_template()
    mistake(template)
    assert schema_errors(kubernetes_schema("podtemplatespec-v1"), template)


def test_a_misspelled_field_in_the_teacher_deployment_is_rejected():
    import kubernetes_validate

    deployment = copy.deepcopy(documents("teacher-vllm.yaml")[0])
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# --- what Ray reads from the RayCluster ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_ray_reads_a_cpu_only_head_and_two_8_gpu_workers(name):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    custom_resource = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
                       "metadata": {"name": "tapir", "namespace": "tapir"}, "spec": cluster_specs()[name]}
    # the KubeRay autoscaler's own reading of the spec; it validates what it derives against Ray's cluster schema
    node_types = _derive_autoscaling_config_from_ray_cr(custom_resource)["available_node_types"]
    head = node_types.pop("headgroup")
    assert head["resources"]["CPU"] == 0 and head["resources"].get("GPU", 0) == 0
    (workers,) = node_types.values()
    assert workers["resources"]["GPU"] == 8
    assert workers["min_workers"] == workers["max_workers"] == 2


def test_the_rayjob_cluster_is_the_long_lived_cluster():
    assert rayjob()["spec"]["rayClusterSpec"] == raycluster()["spec"]


def test_the_kuberay_manifests_name_ray_io_v1_and_this_ray_version():
    import ray

    for document in (rayjob(), raycluster()):
        assert document["apiVersion"] == "ray.io/v1"
    for spec in cluster_specs().values():
        assert ray.__version__.startswith(spec["rayVersion"].rsplit(".", 1)[0])


def test_gpus_are_requested_by_the_worker_pods_and_not_by_the_head():
    for name, spec in cluster_specs().items():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0" and "num-cpus" in head["rayStartParams"], name
        for container in containers(head["template"]):
            for amounts in container.get("resources", {}).values():
                assert not any("gpu" in resource for resource in amounts), f"{name}: head asks for a GPU"
        for group in spec["workerGroupSpecs"]:
            ray_container = group["template"]["spec"]["containers"][0]
            assert ray_container["resources"]["limits"]["nvidia.com/gpu"] == 8, name
            assert ray_container["resources"]["requests"]["nvidia.com/gpu"] == 8, name


def test_the_rayjob_runs_tapir_on_the_shipped_cluster_config_and_cleans_up():
    spec = rayjob()["spec"]
    command = shlex.split(spec["entrypoint"])
    assert command[:2] == ["tapir", "run"] and command[2].startswith(IMAGE_CONFIGS)
    load_config(REPO / "configs" / command[2].removeprefix(IMAGE_CONFIGS))
    assert "COPY --chown=ray:users configs ./configs" in (CLUSTER / "Dockerfile").read_text()
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    images = {c["image"] for t in pod_templates().values() for c in containers(t)}
    assert len(images) == 1, f"one image for every Ray pod, got {images}"


# --- the config fits the cluster ---------------------------------------------------------------------------

def test_the_cluster_config_fits_the_gpu_workers():
    config = load_config(REPO / "configs" / "cluster-gpu.yaml")
    groups = cluster_specs()["rayjob.yaml"]["workerGroupSpecs"]
    per_node = groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    total = sum(g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                for g in groups)
    student = config.student
    # one vLLM engine per actor, its tensor-parallel ranks on that actor's GPUs, on one node
    assert student.num_gpus_per_actor == student.engine.tensor_parallel_size
    assert per_node % student.engine.tensor_parallel_size == 0
    scoring_gpus = student.num_actors * student.num_gpus_per_actor + \
        config.classifier.num_actors * config.classifier.num_gpus_per_actor
    assert scoring_gpus <= total
    assert config.training.use_gpu and config.training.num_workers <= total and config.training.zero_stage == 3


def test_the_config_reaches_the_served_teacher():
    config = load_config(REPO / "configs" / "cluster-gpu.yaml")
    deployment, service = documents("teacher-vllm.yaml")
    url = urlsplit(config.teacher.base_url)
    assert url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert url.port == service["spec"]["ports"][0]["port"]
    vllm = deployment["spec"]["template"]["spec"]["containers"][0]
    assert vllm["command"] == ["vllm", "serve"] and vllm["args"][0] == config.teacher.model
    parallel = int(next(a.split("=", 1)[1] for a in vllm["args"] if a.startswith("--tensor-parallel-size=")))
    assert parallel == vllm["resources"]["limits"]["nvidia.com/gpu"] == 8


# --- secrets -------------------------------------------------------------------------------------------------

def secrets_in_clear(container: dict) -> Iterator[str]:
    """Env entries whose name says secret and whose value is written out instead of read from a Secret."""
    for entry in container.get("env", []):
        if SECRET_WORDS.search(entry["name"]) and "secretKeyRef" not in entry.get("valueFrom", {}):
            yield f"{container['name']}: {entry['name']}"


def all_containers() -> dict[str, dict]:
    found = {f"{where}: {c['name']}": c for where, t in pod_templates().items() for c in containers(t)}
    deployment = documents("teacher-vllm.yaml")[0]
    found.update({f"teacher-vllm.yaml: {c['name']}": c for c in containers(deployment["spec"]["template"])})
    return found


def test_no_key_token_or_credential_is_written_in_a_manifest():
    assert [s for c in all_containers().values() for s in secrets_in_clear(c)] == []
    config = load_config(REPO / "configs" / "cluster-gpu.yaml")
    needed = {config.teacher.api_key_env, "RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name, spec in cluster_specs().items():
        for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
            assert needed <= set(env), f"{name}: {sorted(needed - set(env))} missing"
            assert all("secretKeyRef" in env[n]["valueFrom"] for n in needed)
            assert env["RAY_AUTH_MODE"]["value"] == "token"
    submitter = rayjob()["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert "secretKeyRef" in {e["name"]: e for e in submitter["env"]}["RAY_AUTH_TOKEN"]["valueFrom"]


def test_a_key_written_in_clear_is_caught():
    container = copy.deepcopy(worker_template()["spec"]["containers"][0])
    container["env"][0] = {"name": "TAPIR_TEACHER_API_KEY", "value": "sk-live-0123456789"}
    assert list(secrets_in_clear(container)) == ["ray-worker: TAPIR_TEACHER_API_KEY"]


def test_no_manifest_holds_anything_shaped_like_a_credential():
    shapes = re.compile(r"\bsk-[A-Za-z0-9]{8,}|\bAKIA[0-9A-Z]{16}\b|\bhf_[A-Za-z0-9]{20,}|[0-9a-f]{32,}")
    for path in sorted(CLUSTER.iterdir()):
        assert not shapes.findall(path.read_text()), path.name


# --- the Ray cluster launcher ---------------------------------------------------------------------------------

def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())


def ray_cluster_schema() -> jsonschema.Validator:
    schema = json.loads((resources.files("ray") / "autoscaler" / "ray-schema.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_the_cluster_launcher_yaml_passes_rays_schema():
    assert [e.message for e in ray_cluster_schema().iter_errors(launcher())] == []
    from ray.autoscaler._private.util import prepare_config, validate_config

    # what `ray up` does first: merge with the AWS defaults, check docker and the node types, validate again
    validate_config(prepare_config(launcher()))


@pytest.mark.parametrize("mistake", [
    lambda c: c.__setitem__("setup_comands", c.pop("setup_commands")),
    lambda c: c["docker"].__setitem__("imge", c["docker"].pop("image")),
    lambda c: c.__setitem__("max_workers", "2"),
    lambda c: c["available_node_types"]["gpu_8x"]["resources"].__setitem__("GPU", "8"),
])
def test_a_mistake_in_the_cluster_launcher_yaml_is_rejected(mistake):
    config = launcher()
    mistake(config)
    assert list(ray_cluster_schema().iter_errors(config))


def test_the_cluster_launcher_has_a_cpu_head_and_two_8_gpu_workers():
    config = launcher()
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert [(t["resources"]["GPU"], t["min_workers"], t["max_workers"]) for t in workers] == [(8, 2, 2)]
    assert config["max_workers"] == sum(t["max_workers"] for t in workers)
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2 and start.count(". ~/.tapir-env") == 2


def ec2_run_instances_problems(node_config: dict) -> str:
    """botocore's check of a RunInstances request with this node_config ('' when it is valid)."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    request = botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    report = ParamValidator().validate({"MinCount": 1, "MaxCount": 1, **node_config}, request).generate_report()
    # the validator checks names and types, not enums: the instance type against EC2's list of them
    if node_config.get("InstanceType") not in request.members["InstanceType"].enum:
        report += f"\nunknown InstanceType {node_config.get('InstanceType')!r}"
    return report.strip()


@pytest.mark.parametrize("node_type", sorted(launcher()["available_node_types"]))
def test_each_node_config_is_a_valid_ec2_run_instances_request(node_type):
    assert ec2_run_instances_problems(launcher()["available_node_types"][node_type]["node_config"]) == ""


def test_a_misspelled_ec2_field_or_instance_type_is_rejected():
    node_config = launcher()["available_node_types"]["gpu_8x"]["node_config"]
    assert "BlockDeviceMapings" in ec2_run_instances_problems(
        {**node_config, "BlockDeviceMapings": node_config["BlockDeviceMappings"]})
    assert ec2_run_instances_problems({**node_config, "InstanceType": "p5.48xlarg"})
