"""Every YAML document in cluster/ against the KubeRay CRDs, strictly, and what the issue asks of each.

The CRDs (`../shared/reference/kuberay-crds/`, or `$KUBERAY_CRD_DIR`) do not forbid unknown fields (the
API server prunes them silently), so `strict` adds `additionalProperties: false` to every object schema
that lists `properties`: a misspelled field fails here instead of vanishing on `kubectl apply`.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from cluster_util import LAUNCHES, RAYJOB_JOBS, job_of

from dydit_dist import config as config_lib

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(os.environ.get("KUBERAY_CRD_DIR", REPO.parent / "shared" / "reference" / "kuberay-crds"))
PRESETS = config_lib.PRESET_DIR
AUTH_SECRET = "dydit-ray-auth"
S3_SECRET = "dydit-s3"
MAX_RAYJOB_NAME = 47  # KubeRay's MaxRayJobNameLength; RayJob and RayCluster names are DNS-1035 labels
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DOTLIST = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+=\S+$")

OBJECT_META = {  # what a manifest may say in metadata (the CRDs only say `type: object`)
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
SECRET = {  # core/v1 Secret, the fields a manifest sets
    "type": "object",
    "required": ["apiVersion", "kind", "metadata"],
    "properties": {
        "apiVersion": {"enum": ["v1"]},
        "kind": {"enum": ["Secret"]},
        "metadata": OBJECT_META,
        "type": {"type": "string"},
        "immutable": {"type": "boolean"},
        "stringData": {"type": "object", "additionalProperties": {"type": "string"}},
        "data": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(schema: dict) -> dict:
    """A copy of an OpenAPI v3 schema in which objects that list `properties` allow nothing else."""
    out = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: strict(sub) for name, sub in out[key].items()}
    for key in ("additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    """(apiVersion, kind) -> strict validator, for the KubeRay CRDs and Secret."""
    if not CRD_DIR.is_dir():
        raise FileNotFoundError(
            f"KubeRay CRDs not found in {CRD_DIR}; set KUBERAY_CRD_DIR (see SOURCE.md there)"
        )
    validators = {("v1", "Secret"): jsonschema.Draft4Validator(strict(SECRET))}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META
            schema["properties"]["apiVersion"] = {"enum": [f"{group}/{version['name']}"]}
            schema["properties"]["kind"] = {"enum": [kind]}
            schema["required"] = sorted(
                {*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"}
            )
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft4Validator(strict(schema))
    return validators


VALIDATORS = _crd_validators()
FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
DOCS = [(path, i, doc) for path in FILES for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]
DOC_IDS = [f"{path.relative_to(CLUSTER)}#{i}" for path, i, _ in DOCS]
RAYJOBS = {doc["metadata"]["name"].removeprefix("dydit-"): doc for _, _, doc in DOCS if doc["kind"] == "RayJob"}


def errors(doc: dict) -> list[str]:
    validator = VALIDATORS.get((doc.get("apiVersion"), doc.get("kind")))
    if validator is None:
        return [f"no schema for apiVersion={doc.get('apiVersion')!r} kind={doc.get('kind')!r}"]
    found = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) of the RayCluster and of every RayJob's cluster."""
    specs = []
    for path, i, doc in DOCS:
        if doc["kind"] == "RayCluster":
            specs.append((f"{path.name}#{i}", doc["spec"]))
        elif doc["kind"] == "RayJob":
            specs.append((f"{path.name}#{i}", doc["spec"]["rayClusterSpec"]))
    return specs


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    return [(name, group["template"]) for name, group in groups]


def containers(doc: dict) -> list[dict]:
    """Every container of a manifest, init containers included."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                if isinstance(node.get(key), list):
                    found.extend(node[key])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    return found


def header_text(path: Path) -> str:
    """The comment a manifest starts with, its lines joined with spaces."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.removeprefix("#").strip())
    return " ".join(line for line in lines if line)


def head_container(spec: dict) -> dict:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def pinned_ray_version() -> str:
    for dep in pyproject()["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match[2]
    raise AssertionError("pyproject.toml does not pin ray with ==")


# ----------------------------------------------------------------------------- schema


def test_manifests_exist():
    kinds = sorted(doc["kind"] for _, _, doc in DOCS)
    assert kinds.count("RayCluster") == 1
    assert kinds.count("RayJob") == len(LAUNCHES)
    assert sorted(RAYJOBS) == sorted(LAUNCHES)
    assert {doc["metadata"]["name"] for _, _, doc in DOCS if doc["kind"] == "Secret"} == {
        S3_SECRET,
        AUTH_SECRET,
    }


@pytest.mark.parametrize("path, index, doc", DOCS, ids=DOC_IDS)
def test_document_validates_strictly_against_its_crd(path, index, doc):
    assert errors(doc) == []


def test_strict_schema_rejects_a_misspelled_entrypoint():
    doc = copy.deepcopy(RAYJOBS["finetune"])
    doc["spec"]["entrypointt"] = doc["spec"].pop("entrypoint")
    found = errors(doc)
    assert len(found) == 1 and "'entrypointt' was unexpected" in found[0], found


HEAD = ("headGroupSpec", "template", "spec", "containers", 0)
WORKERS = ("workerGroupSpecs", 0)


@pytest.mark.parametrize(
    "where, field, value, expected",
    [
        (WORKERS, "rayStartParam", {}, "'rayStartParam' was unexpected"),
        (HEAD, "imagePullPolicyy", "Always", "'imagePullPolicyy' was unexpected"),
        (WORKERS, "maxReplicas", "four", "'four' is not of type 'integer'"),
        (("authOptions",), "mode", "tokens", "'tokens' is not one of"),
        ((*HEAD, "env", 2, "valueFrom", "secretKeyRef"), "nam", "x", "'nam' was unexpected"),  # env 0, 1: values
    ],
    ids=["group field", "container field", "wrong type", "enum", "secretKeyRef field"],
)
def test_strict_schema_rejects_deep_mistakes(where, field, value, expected):
    doc = copy.deepcopy(RAYJOBS["sample"])
    node = doc["spec"]["rayClusterSpec"]
    for key in where:
        node = node[key]
    node[field] = value
    found = errors(doc)
    assert any(expected in e for e in found), found


def test_unknown_kind_has_no_schema():
    assert errors({"apiVersion": "ray.io/v1", "kind": "RayJobb", "metadata": {"name": "x"}, "spec": {}}) != []


# ----------------------------------------------------------------------------- entrypoints


def _entrypoint(doc: dict) -> tuple[str, str, list[str]]:
    """(job module, preset, overrides) of a RayJob's `python -m jobs.<job> --config <preset> <overrides>`."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[3] == "--config", f"entrypoint: {doc['spec']['entrypoint']}"
    return argv[2], argv[4], argv[5:]


def _entrypoint_config(doc: dict) -> config_lib.Config:
    _, preset, overrides = _entrypoint(doc)
    return config_lib.load(preset, overrides)


@pytest.mark.parametrize("launch", LAUNCHES)
def test_entrypoint_runs_a_job_with_a_preset_and_valid_overrides(launch):
    doc = RAYJOBS[launch]
    module, preset, overrides = _entrypoint(doc)
    assert module == f"jobs.{job_of(launch)}"
    assert (PRESETS / f"{preset}.yaml").is_file(), f"{preset} is not in {sorted(config_lib.presets())}"
    bad = [o for o in overrides if not DOTLIST.match(o)]
    assert bad == [], f"not `key.path=value` dotlist overrides: {bad}"
    _entrypoint_config(doc)  # every key exists, every value fits


@pytest.mark.parametrize("launch", LAUNCHES)
def test_a_retry_waits_out_the_lost_attempts_driver(launch):
    """A RayJob's retry deletes the cluster without stopping the job: the head's drain keeps the old driver
    (and its lease's heartbeat) alive until the pod's grace period ends, and its lease then needs half its
    ttl to count as abandoned (`lease.Lease.acquire`). The retry's job waits that long for it
    (storage.lease_wait_s) instead of exiting 2 and spending a retry."""
    doc = RAYJOBS[launch]
    cfg = _entrypoint_config(doc)
    grace_s = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert cfg.storage.lease_wait_s >= grace_s + cfg.storage.lease_ttl_s / 2, launch


@pytest.mark.parametrize("launch", LAUNCHES)
def test_the_gpu_pods_past_the_first_get_the_time_the_first_gets(launch):
    """preRunningDeadlineSeconds waits for the head and the group's first replica only; the job waits for
    the rest of its GPUs itself (ray.capacity_timeout_s, then exit 2 and a retry on a fresh cluster)."""
    doc = RAYJOBS[launch]
    assert _entrypoint_config(doc).ray.capacity_timeout_s >= doc["spec"]["preRunningDeadlineSeconds"], launch


@pytest.mark.parametrize("job", RAYJOB_JOBS)
def test_entrypoint_job_module_exists(job):
    """The entrypoint's module is a job with a `main(argv)`."""
    module = importlib.import_module(f"jobs.{job}")
    assert callable(getattr(module, "main", None)), f"jobs/{job}.py has no main(argv)"


def test_rayjob_names_and_files():
    for path, _, doc in DOCS:
        if doc["kind"] in ("RayJob", "RayCluster"):
            name = doc["metadata"]["name"]
            assert DNS_1035.match(name) and len(name) <= MAX_RAYJOB_NAME, name
        if doc["kind"] == "RayJob":
            launch = doc["metadata"]["name"].removeprefix("dydit-")
            assert doc["metadata"]["name"] == f"dydit-{launch}" and launch in LAUNCHES
            assert path.name == f"rayjob-{launch}.yaml"
            assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == job_of(launch)


# ----------------------------------------------------------------------------- pins, auth, credentials


def test_ray_version_and_image_are_pinned_and_the_same_everywhere():
    ray_version = pinned_ray_version()
    images = set()
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == ray_version, where
    for _, _, doc in DOCS:
        images |= {c["image"] for c in containers(doc)}
    assert len(images) == 1, f"containers run different images: {sorted(images)}"
    image = images.pop()
    assert "@sha256:" in image or image.rsplit(":", 1)[-1] == pyproject()["version"], (
        f"{image}: pin the image by digest or by the project version {pyproject()['version']}"
    )


def test_a_rebuilt_image_reaches_new_pods():
    """The README rebuilds and pushes the same tag: a node that kept the old image under that tag
    (`IfNotPresent`) would run it. A tag is pulled at every pod start; a digest cannot change."""
    for path, _, doc in DOCS:
        for container in containers(doc):
            assert "@sha256:" in container["image"] or container.get("imagePullPolicy") == "Always", (
                f"{path.name} {container['name']}: pin the image by digest or pull it with imagePullPolicy: Always"
            )


def test_token_authentication_is_on():
    for where, spec in cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}, where
    secrets = {doc["metadata"]["name"]: doc for _, _, doc in DOCS if doc["kind"] == "Secret"}
    assert set(secrets[AUTH_SECRET]["stringData"]) == {"auth_token"}  # the key KubeRay reads


CREDENTIAL_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|^AWS_")
CREDENTIAL_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\b[0-9a-f]{32,}\b"),  # a hex token (Ray's are 64 hex digits)
    re.compile(r"[A-Za-z0-9/+]{40}"),  # an AWS secret access key
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),  # user:password@ in a URL
]


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def credential_problems(doc: dict) -> list[str]:
    """Credentials written in a manifest: a Secret may hold placeholders only, the rest references Secrets."""
    if doc["kind"] == "Secret":
        problems = ["data: the example Secret holds placeholders in stringData only"] if "data" in doc else []
        problems += [
            f"stringData.{key}: {value!r} is not a <placeholder>"
            for key, value in doc.get("stringData", {}).items()
            if not (value.startswith("<") and value.endswith(">"))
        ]
        return problems
    problems = []
    for container in containers(doc):
        if "envFrom" in container:
            problems.append(f"{container['name']}: envFrom; name each variable and its Secret key")
        for env in container.get("env", []):
            if not CREDENTIAL_NAME.search(env["name"]):
                continue
            ref = env.get("valueFrom", {}).get("secretKeyRef", {})
            if "value" in env or ref.get("name") != S3_SECRET:
                problems.append(f"{container['name']}: {env['name']} must come from the Secret {S3_SECRET}")
    leaks = sorted({s for s in strings(doc) if any(p.search(s) for p in CREDENTIAL_TEXT)})
    problems += [f"credential-like text: {s!r}" for s in leaks]
    return problems


@pytest.mark.parametrize("path, index, doc", DOCS, ids=DOC_IDS)
def test_no_credentials_in_manifests(path, index, doc):
    assert credential_problems(doc) == []


def test_credentials_written_in_a_manifest_are_found():
    doc = copy.deepcopy(RAYJOBS["evaluate"])
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"})
    head["env"].append({"name": "RAY_AUTH_TOKEN", "value": "0123456789abcdef" * 4})
    doc["spec"]["entrypoint"] += " storage.root=s3://user:hunter2@bucket/x"
    problems = credential_problems(doc)
    assert sum("must come from the Secret" in p for p in problems) == 2
    assert sum("credential-like text" in p for p in problems) == 3
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "stringData": {"k": "real"}}
    assert credential_problems(secret) == ["stringData.k: 'real' is not a <placeholder>"]


def test_s3_settings_reach_every_ray_container():
    expected = {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    secret = next(
        doc for _, _, doc in DOCS if doc["kind"] == "Secret" and doc["metadata"]["name"] == S3_SECRET
    )
    assert set(secret["stringData"]) == expected
    for where, spec in cluster_specs():
        for group, template in pod_templates(spec):
            env = {e["name"] for e in template["spec"]["containers"][0].get("env", [])}
            assert expected <= env, f"{where} {group}: missing {sorted(expected - env)}"
            for e in template["spec"]["containers"][0]["env"]:  # each variable reads its own key
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if e["name"] in expected:
                    assert ref == {**ref, "name": S3_SECRET, "key": e["name"]}, f"{where} {group}: {e}"


# ----------------------------------------------------------------------------- cluster shape and job lifecycle


def test_cluster_shape():
    for where, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-gpus") == "0", f"{where}: the head must not offer GPUs"
        head_resources = head["template"]["spec"]["containers"][0]["resources"]
        assert all("nvidia.com/gpu" not in head_resources.get(k, {}) for k in ("requests", "limits")), where
        assert spec.get("enableInTreeAutoscaling") is True, where
        gpu_groups = [
            g
            for g in spec["workerGroupSpecs"]
            if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        ]
        assert gpu_groups, f"{where}: no GPU worker group"
        for group in gpu_groups:
            pod = group["template"]["spec"]
            resources = pod["containers"][0]["resources"]
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], where
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], where
            assert group["maxReplicas"] >= 1, where
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert any(mounts.get(v["name"]) == "/dev/shm" for v in shm), (
                f"{where}: no shared memory for NCCL"
            )
        # Ray's object store lives in /dev/shm and by default takes 95% of it (or spills to disk when its
        # default is larger): each pod sets it to leave room for NCCL and the DataLoader workers
        for group, template in pod_templates(spec):
            params = head["rayStartParams"] if group == "head" else \
                next(g for g in spec["workerGroupSpecs"] if g["groupName"] == group)["rayStartParams"]
            shm = next(v for v in template["spec"]["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory")
            shm_bytes = int(shm["emptyDir"]["sizeLimit"].removesuffix("Gi")) * 2**30
            assert 0 < int(params["object-store-memory"]) <= 0.6 * shm_bytes, f"{where} {group}: {params}"


def test_a_stopped_job_has_time_to_release_its_lease():
    """`ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default): the head
    gives the job's handler longer than one storage operation to release the run's lease."""
    timeout_s = config_lib.StorageConfig().timeout_s
    for where, spec in cluster_specs():
        env = {e["name"]: e.get("value") for e in head_container(spec)["env"]}
        assert float(env["RAY_JOB_STOP_WAIT_TIME_S"]) > timeout_s, where


def test_a_deleted_head_pod_gives_the_job_its_stop_wait():
    """`kubectl delete rayjob` stops the job (SIGTERM to the driver) and deletes the cluster at once. The
    head pod's SIGTERM makes `ray start --block` drain for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s by
    default) before it kills Ray's processes, the driver with them; the kubelet SIGKILLs the pod after
    terminationGracePeriodSeconds (30 s by default). Both outlast the job's stop wait."""
    for where, spec in cluster_specs():
        env = {e["name"]: e.get("value") for e in head_container(spec)["env"]}
        stop_wait_s = float(env["RAY_JOB_STOP_WAIT_TIME_S"])
        drain_s = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        grace_s = spec["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert stop_wait_s < drain_s < grace_s, f"{where}: stop wait {stop_wait_s}, drain {drain_s}, grace {grace_s}"


def test_rayjob_lifecycle():
    for job, doc in RAYJOBS.items():
        spec = doc["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, job
        assert spec["ttlSecondsAfterFinished"] > 0, job
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", job
        assert "clusterSelector" not in spec and "runtimeEnvYAML" not in spec, job


def test_rayjob_retries_and_says_what_they_meet():
    """KubeRay retries every failed attempt on a fresh cluster whatever the exit code: a lost head pod is
    survived (the retry resumes from storage), an input error (exit 2) is met again on every attempt. The
    header says both and points to `--dry-run`, which finds input errors in seconds without a GPU."""
    limits = {job: doc["spec"].get("backoffLimit", 0) for job, doc in RAYJOBS.items()}
    assert len(set(limits.values())) == 1 and min(limits.values()) >= 1, limits
    for job in RAYJOBS:
        text = header_text(CLUSTER / "kuberay" / f"rayjob-{job}.yaml")
        for said in (f"backoffLimit: {limits[job]}", "whatever the exit code", "input error", "--dry-run"):
            assert said in text, f"rayjob-{job}.yaml: the header does not say {said!r}"


def test_rayjob_fails_when_its_cluster_never_runs():
    """Without preRunningDeadlineSeconds a RayJob whose pods never run (a missing Secret, an image that
    does not pull, GPU nodes that never come) stays Initializing forever. GPU nodes scaling up and the
    image pull (Ray, CUDA, torch: gigabytes) take a while, so the deadline is generous."""
    deadlines = {job: doc["spec"].get("preRunningDeadlineSeconds") for job, doc in RAYJOBS.items()}
    assert len(set(deadlines.values())) == 1, deadlines
    for job, deadline in deadlines.items():
        assert deadline is not None and deadline >= 1800, f"rayjob-{job}.yaml: preRunningDeadlineSeconds {deadline}"
        text = header_text(CLUSTER / "kuberay" / f"rayjob-{job}.yaml")
        assert f"preRunningDeadlineSeconds: {deadline}" in text, f"rayjob-{job}.yaml: the header does not say it"


def test_rayjob_clusters_are_the_raycluster():
    raycluster = next(doc for _, _, doc in DOCS if doc["kind"] == "RayCluster")
    for job, doc in RAYJOBS.items():
        assert doc["spec"]["rayClusterSpec"] == raycluster["spec"], (
            f"rayjob-{job}.yaml: rayClusterSpec differs from raycluster.yaml's spec; keep them the same"
        )


def cluster_text(path: Path, key: str) -> str:
    """The text after the first line `key:` to the end of the file, comments included, dedented by that
    line's indentation: the cluster spec of a RayCluster (`spec`) or of a RayJob (`rayClusterSpec`, last)."""
    lines = path.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.strip() == f"{key}:")
    indent = len(lines[at]) - len(lines[at].lstrip())
    return "".join(line[indent:] for line in lines[at + 1 :])


def test_rayjob_clusters_carry_the_raycluster_comments():
    """The README's multi-node steps uncomment the NCCL environment and RDMA requests: those commented
    blocks (which parsing ignores) are in every copy of the cluster, so the steps hold for a RayJob too."""
    raycluster = cluster_text(CLUSTER / "kuberay" / "raycluster.yaml", "spec")
    assert "NCCL_SOCKET_IFNAME" in raycluster and "RDMA" in raycluster
    for job in RAYJOBS:
        assert cluster_text(CLUSTER / "kuberay" / f"rayjob-{job}.yaml", "rayClusterSpec") == raycluster, (
            f"rayjob-{job}.yaml: its rayClusterSpec, comments included, differs from raycluster.yaml's spec"
        )


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CLUSTER)) for p in FILES])
def test_each_file_starts_with_a_header_saying_what_it_runs_and_what_to_change(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 5, (
        f"{path.name}: start with a comment saying what it runs and which values to change"
    )
    assert any(line.startswith("# Change:") for line in header), f"{path.name}: no '# Change:' paragraph"
