"""infra/: every KubeRay manifest validates against the KubeRay CRD schemas (tests/data/kuberay-crds) with
unknown fields refused; the scheduled RayCronJob runs pipelines/label.py on a job spec of jobs/; every cluster runs
Ray's token authentication (the launcher config, validated against Ray's own schema, and every KubeRay manifest)
and its dashboard is not open to the network; no credentials, no token."""

import copy
import json
import re
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from pipeline_scripts import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).resolve().parent / "data" / "kuberay-crds"
# The API server checks a resource's own metadata as ObjectMeta (the CRD schema leaves it open); these are the
# ObjectMeta fields a manifest may set.
OBJECT_META = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
    "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
CREDENTIAL_NAMES = re.compile(r"SECRET|ACCESS_KEY|SESSION_TOKEN|AUTH_TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
# Where each kind holds its RayClusterSpec, the object whose authOptions turns on Ray's token authentication.
CLUSTER_SPEC = {"RayCluster": ("spec",), "RayJob": ("spec", "rayClusterSpec"),
                "RayCronJob": ("spec", "jobTemplate", "rayClusterSpec")}


def strict(schema):
    """An OpenAPI v3 schema of a CRD as a JSON schema that refuses unknown fields, as Kubernetes does: an object
    with ``properties`` takes no others unless the schema says so (``additionalProperties`` or
    ``x-kubernetes-preserve-unknown-fields``)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    """(apiVersion, kind) -> a validator of that served version's schema, for every CRD in tests/data."""
    found = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)  # libyaml: 3 MB of schemas in ~2 s
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = strict(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = OBJECT_META
                schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata", "spec"})
                found[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = \
                    jsonschema.Draft4Validator(schema)
    return found


def kuberay_manifests() -> list[tuple[str, dict]]:
    """(file, document) of every KubeRay resource in the YAML files under infra/."""
    docs = []
    for path in sorted((ROOT / "infra").rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/"):
                docs.append((str(path.relative_to(ROOT)), doc))
    return docs


def problems(doc: dict) -> list[str]:
    validator = validators().get((doc["apiVersion"], doc["kind"]))
    if validator is None:
        return [f"no CRD serves {doc['apiVersion']} {doc['kind']}"]
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_schemas_of_all_three_kinds_are_here():
    assert {kind for _, kind in validators()} == {"RayCluster", "RayJob", "RayCronJob"}


@pytest.mark.parametrize("name, doc", kuberay_manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_kuberay_manifest_validates_with_unknown_fields_refused(name, doc):
    assert problems(doc) == [], name


def test_the_check_refuses_unknown_and_mistyped_fields():
    cron = next(doc for _, doc in kuberay_manifests() if doc["kind"] == "RayCronJob")
    bad = copy.deepcopy(cron)
    bad["spec"]["concurrencyPolicy"] = "Forbid"  # a Kubernetes CronJob field that RayCronJob does not have
    worker = bad["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["imagee"] = "typo"
    worker["maxReplicas"] = "16"
    found = "\n".join(problems(bad))
    assert "'concurrencyPolicy' was unexpected" in found and "'imagee' was unexpected" in found
    assert "maxReplicas: '16' is not of type 'integer'" in found
    bad = copy.deepcopy(cron)
    bad["metadata"]["uid"] = "x"
    assert problems(bad) == ["metadata: Additional properties are not allowed ('uid' was unexpected)"]


def test_a_raycronjob_schedules_label_py_with_a_job_spec_of_jobs():
    crons = [doc for _, doc in kuberay_manifests() if doc["kind"] == "RayCronJob"]
    assert crons
    label = load_pipeline("label")
    for cron in crons:
        assert len(cron["spec"]["schedule"].split()) == 5
        argv = shlex.split(cron["spec"]["jobTemplate"]["entrypoint"])
        assert argv[:2] == ["python", "pipelines/label.py"]
        spec = argv[argv.index("--config") + 1]
        assert spec.startswith("jobs/") and (ROOT / spec).is_file()
        job = label.load_job(label.build_parser().parse_args(["--config", str(ROOT / spec), *argv[4:]]))
        assert job.output.startswith("s3://") and job.labeler.device == "cuda"


def _gpus(cluster_spec: dict) -> int:
    """The GPUs a RayClusterSpec's worker groups reach at most: maxReplicas x each pod's nvidia.com/gpu limit."""
    return sum(group["maxReplicas"] * sum(int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
                                          for c in group["template"]["spec"]["containers"])
               for group in cluster_spec["workerGroupSpecs"])


def test_every_labelling_job_runs_one_actor_per_gpu_of_its_cluster():
    label = load_pipeline("label")
    jobs = [(name, doc) for name, doc in kuberay_manifests() if doc["kind"] in ("RayJob", "RayCronJob")]
    assert len(jobs) == 2
    for name, doc in jobs:
        spec = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[:2] == ["python", "pipelines/label.py"], name
        args = [str(ROOT / a) if a.startswith("jobs/") else a for a in argv[2:]]
        job = label.load_job(label.build_parser().parse_args(args))
        assert job.num_actors == _gpus(spec["rayClusterSpec"]), name


def test_every_pod_runs_as_the_object_store_service_account():
    for name, doc in kuberay_manifests():
        cluster = _at(doc, CLUSTER_SPEC[doc["kind"]])
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            assert group["template"]["spec"].get("serviceAccountName") == "denseclip-labeler", name


def test_no_credentials_in_infra_or_jobs():
    for path in sorted([*(ROOT / "infra").rglob("*"), *(ROOT / "jobs").glob("*.yaml")]):
        if not path.is_file():
            continue
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path  # an AWS access key id
        for doc in yaml.safe_load_all(text) if path.suffix in (".yaml", ".yml") else ():
            for env in _env_vars(doc):
                assert not (CREDENTIAL_NAMES.search(env["name"]) and "value" in env), (path, env["name"])


def _env_vars(node) -> list[dict]:
    if isinstance(node, list):
        return [e for item in node for e in _env_vars(item)]
    if not isinstance(node, dict):
        return []
    found = [e for e in node.get("env", []) if isinstance(e, dict) and "name" in e]
    return found + [e for key, value in node.items() if key != "env" for e in _env_vars(value)]


def _at(node, path: tuple[str, ...]):
    for key in path:
        node = node[key]
    return node


def _schema_paths(schema, key: str, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """(object path, schema) of every property named ``key`` in an OpenAPI schema."""
    found = []
    for name, sub in schema.get("properties", {}).items():
        if name == key:
            found.append(((*path, name), sub))
        found += _schema_paths(sub, key, (*path, name))
    return found + (_schema_paths(schema["items"], key, path) if "items" in schema else [])


def test_the_crd_schemas_define_token_authentication_in_each_kinds_cluster_spec():
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        kind = crd["spec"]["names"]["kind"]
        # ray.io/v1, the version our manifests use (the deprecated v1alpha1, still served, has no authOptions: a
        # manifest of it that sets them fails the strict validation above)
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        found = _schema_paths(v1["schema"]["openAPIV3Schema"], "authOptions")
        assert [p for p, _ in found] == [(*CLUSTER_SPEC[kind], "authOptions")], (kind, found)
        assert found[0][1]["properties"]["mode"]["enum"] == ["disabled", "token"]
    assert {doc["apiVersion"] for _, doc in kuberay_manifests()} == {"ray.io/v1"}


def test_every_kuberay_cluster_runs_token_authentication():
    kinds = set()
    for name, doc in kuberay_manifests():
        assert _at(doc, CLUSTER_SPEC[doc["kind"]]).get("authOptions") == {"mode": "token"}, name
        kinds.add(doc["kind"])
    assert kinds == set(CLUSTER_SPEC)
    cron = next(doc for _, doc in kuberay_manifests() if doc["kind"] == "RayCronJob")
    bad = copy.deepcopy(cron)
    _at(bad, CLUSTER_SPEC["RayCronJob"])["authOptions"] = {"mode": "tokens"}
    assert "'tokens' is not one of ['disabled', 'token']" in "\n".join(problems(bad))
    for name, doc in kuberay_manifests():
        head = _at(doc, CLUSTER_SPEC[doc["kind"]])["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name  # no LoadBalancer or NodePort


def test_the_launcher_config_runs_token_authentication_with_the_dashboard_behind_ssh():
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # what `ray up` checks first
    # every process in every node's container has RAY_AUTH_MODE=token
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert not any(key in config["docker"] for key in ("head_run_options", "worker_run_options", "head_image",
                                                       "worker_image"))
    # the token reaches each node from the launching machine, at Ray's default path, never from this repository
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert not [p for p in ROOT.rglob("auth_token") if ".git" not in p.parts]
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert not any("RAY_AUTH_MODE" in command for command in starts)  # one place for it: the container's
    head = next(shlex.split(c) for c in config["head_start_ray_commands"] if c.startswith("ray start"))
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard` (SSH), not over the network
