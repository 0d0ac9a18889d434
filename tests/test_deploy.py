"""deploy/k8s: the Kubernetes manifests, checked offline (no cluster, no kubectl).

Every YAML file is loaded; every kustomization's resources and patches exist
and every file is listed by one. The kustomizations are rendered here, in a
small way: resources, strategic-merge patch files (maps merge; lists of
containers, env, volumes, volumeMounts by name, container ports by
containerPort; other lists are replaced, as Kubernetes' merge keys have it),
namespace (a Namespace object is renamed, as kustomize does), labels and
images. A kustomization field this renderer does not know fails the test, so
what is checked is what kubectl applies. Every object, as written and as
rendered, is validated against the schemas kubernetes-validate bundles (the
newest, and 1.28, the oldest these manifests support: the
apps.kubernetes.io/pod-index label), strictly (no unknown fields).

Then, on each rendered set: Services and PDBs select pods of a workload,
their targetPorts are container ports, a StatefulSet's serviceName is a
headless Service selecting its pods, probes dial ports the container has,
every ConfigMap/Secret reference names a key that exists (the TLS Secret
is made by the operator: its keys are documented in deploy/README.md), the
shard count agrees in its three places, the pods run restricted, the grace
period outlasts memoryd's, and each container's command line parses with
memoryd's own CLI (click) after $(VAR) substitution; a shard's also loads
as a memoryd Config.
"""
from __future__ import annotations

import copy
import functools
import re
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from memoryd.daemon import config as cfg
from memoryd.daemon.cli import main as memoryd_cli

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [BASE, *OVERLAYS]
README = ROOT / "deploy" / "README.md"
OLDEST = "1.28"            # apps.kubernetes.io/pod-index (the shard index) is 1.28's
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches",
                        "images"}
# Secrets the operator creates (not in the manifests: a real one must not be
# overwritten by an apply): name -> keys. deploy/README.md documents them.
EXTERNAL_SECRETS = {"memoryd-tls": {"tls.crt", "tls.key", "ca.crt"}}
PLACEHOLDER = "CHANGE-ME"
WORKLOADS = ("StatefulSet", "Deployment")
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ---- loading and rendering ------------------------------------------------------------
def load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomization(kdir: Path) -> dict:
    (k,) = load_docs(kdir / "kustomization.yaml")
    return k


def merge_key(items: list) -> str | None:
    """The strategic-merge key of a list (Kubernetes' patchMergeKey), or None: replace."""
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    if all("containerPort" in i for i in items):
        return "containerPort"
    if all("name" in i for i in items):
        return "name"
    return None


# lists merged by key in Kubernetes' strategic merge (others are replaced whole)
MERGED_LISTS = {"containers", "initContainers", "env", "volumes", "volumeMounts", "ports"}


def strategic_merge(base, patch, field: str = ""):
    if isinstance(base, dict) and isinstance(patch, dict):
        assert "$patch" not in patch, "the test's renderer does not do $patch directives"
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGED_LISTS:
        key = merge_key(base + patch)
        if key is not None:
            out = [copy.deepcopy(b) for b in base]
            for p in patch:
                at = [i for i, b in enumerate(out) if b[key] == p[key]]
                if at:
                    out[at[0]] = strategic_merge(out[at[0]], p, field)
                else:
                    out.append(copy.deepcopy(p))
            return out
    return copy.deepcopy(patch)


def ident(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def patch_files(kdir: Path) -> list[Path]:
    out = []
    for p in kustomization(kdir).get("patches", []):
        assert set(p) == {"path"}, f"{kdir}: only `patches: - path: FILE` is rendered here: {p}"
        out.append(kdir / p["path"])
    return out


def render(kdir: Path) -> list[dict]:
    """What `kubectl kustomize kdir` gives for the features these files use."""
    k = kustomization(kdir)
    unknown = set(k) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{kdir}: kustomization fields {unknown} are not rendered by this test"
    objs: list[dict] = []
    for r in k.get("resources", []):
        path = kdir / r
        objs += render(path) if path.is_dir() else [copy.deepcopy(d) for d in load_docs(path)]
    for path in patch_files(kdir):
        (patch,) = load_docs(path)
        hits = [i for i, o in enumerate(objs) if ident(o) == ident(patch)]
        assert len(hits) == 1, f"{path}: patches {ident(patch)}, which {kdir} does not have"
        objs[hits[0]] = strategic_merge(objs[hits[0]], patch)
    ns = k.get("namespace")
    for o in objs:
        if ns and o["kind"] == "Namespace":
            o["metadata"]["name"] = ns
        elif ns:
            o["metadata"]["namespace"] = ns
    for entry in k.get("labels", []):
        assert not entry.get("includeSelectors"), "selectors are immutable: keep them explicit"
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeTemplates") and "template" in o.get("spec", {}):
                o["spec"]["template"]["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in k.get("images", []):
        for c in containers_of(objs):
            if c["image"].split(":")[0] == image["name"]:
                c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objs


def containers_of(objs: list[dict]) -> list[dict]:
    return [c for o in objs if o["kind"] in WORKLOADS
            for c in o["spec"]["template"]["spec"]["containers"]]


def all_yaml() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


NAMES = {kdir.relative_to(K8S).as_posix(): kdir for kdir in KUSTOMIZATIONS}


@functools.cache
def _rendered(name: str) -> list[dict]:
    return render(NAMES[name])


def rendered(name: str) -> list[dict]:
    return copy.deepcopy(_rendered(name))


@pytest.fixture(params=list(NAMES))
def objs(request) -> list[dict]:
    return rendered(request.param)


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, name: str) -> dict:
    (o,) = [o for o in objs if ident(o) == (kind, name)]
    return o


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pods_selected(objs: list[dict], selector: dict) -> list[dict]:
    return [o for o in objs if o["kind"] in WORKLOADS
            and selects(selector, o["spec"]["template"]["metadata"].get("labels", {}))]


def shard_set(objs: list[dict]) -> dict:
    return one(objs, "StatefulSet", "memoryd-shard")


def config(objs: list[dict]) -> dict:
    return one(objs, "ConfigMap", "memoryd-config")["data"]


# ---- files and kustomizations ---------------------------------------------------------
def test_every_yaml_loads_and_is_listed():
    listed: dict[Path, Path] = {}
    for kdir in KUSTOMIZATIONS:
        k = kustomization(kdir)
        assert k["kind"] == "Kustomization" and k.get("resources"), kdir
        for r in k["resources"]:
            path = (kdir / r).resolve()
            assert path.exists(), f"{kdir}/kustomization.yaml lists {r}, which does not exist"
            if path.is_dir():
                assert (path / "kustomization.yaml").is_file(), f"{path}: no kustomization.yaml"
            else:
                assert path not in listed, f"{path} is listed twice"
                listed[path] = kdir
        for path in patch_files(kdir):
            assert path.is_file(), f"{kdir}: patch {path.name} does not exist"
            listed[path.resolve()] = kdir
    files = all_yaml()
    assert files, "no YAML under deploy/k8s"
    for path in files:
        docs = load_docs(path)           # parses
        assert docs, f"{path} is empty"
        if path.name != "kustomization.yaml":
            assert path.resolve() in listed, f"{path} is in no kustomization's resources or patches"
            assert path.parent in KUSTOMIZATIONS, f"{path} is outside a kustomization's folder"
    assert BASE in KUSTOMIZATIONS and (K8S / "overlays" / "dev") in KUSTOMIZATIONS


def test_overlay_patches_target_base_objects():
    for kdir in OVERLAYS:
        below = [o for r in kustomization(kdir)["resources"] for o in render(kdir / r)]
        names = {ident(o) for o in below}
        for path in patch_files(kdir):
            (patch,) = load_docs(path)
            assert ident(patch) in names, f"{path} patches {ident(patch)}: no such object"
            target = next(o for o in below if ident(o) == ident(patch))
            assert patch["apiVersion"] == target["apiVersion"], path


def validate(obj: dict, where: str) -> None:
    for version in (kubernetes_validate.latest_version(), OLDEST):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{where}: {ident(obj)} is not valid Kubernetes {version}: "
                        f"{path}: {e.message}")


def test_every_object_validates():
    newest = kubernetes_validate.latest_version()
    assert tuple(map(int, newest.split(".")[:2])) >= tuple(map(int, OLDEST.split(".")))
    seen = 0
    for path in all_yaml():
        if path.name == "kustomization.yaml" or path.parent != BASE:
            continue                     # overlays hold partial patches: checked rendered
        for obj in load_docs(path):
            validate(obj, str(path.relative_to(ROOT)))
            seen += 1
    for name in NAMES:
        for obj in rendered(name):
            validate(obj, f"rendered {name}")
            seen += 1
    assert seen > 20


# ---- cross-checks, on each rendered set --------------------------------------------------
def container_ports(workload: dict) -> dict:
    """{name or number: containerPort} of a workload's containers."""
    out = {}
    for c in workload["spec"]["template"]["spec"]["containers"]:
        for p in c.get("ports", []):
            out[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                out[p["name"]] = p["containerPort"]
    return out


def test_expected_objects(objs):
    kinds = {ident(o) for o in objs}
    for want in [("ConfigMap", "memoryd-config"), ("Service", "memoryd-shards"),
                 ("StatefulSet", "memoryd-shard"), ("PodDisruptionBudget", "memoryd-shard"),
                 ("Deployment", "memoryd-router"), ("Service", "memoryd"),
                 ("PodDisruptionBudget", "memoryd-router"), ("Secret", "memoryd-catalog"),
                 ("Service", "memoryd-postgres"), ("StatefulSet", "memoryd-postgres")]:
        assert want in kinds, f"missing {want}"
    (ns,) = by_kind(objs, "Namespace")        # renamed by an overlay's namespace
    assert all(o["metadata"].get("namespace") == ns["metadata"]["name"]
               for o in objs if o["kind"] != "Namespace")
    for o in objs:
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "memoryd", ident(o)


def test_services_select_pods_and_their_ports(objs):
    for svc in by_kind(objs, "Service"):
        pods = pods_selected(objs, svc["spec"].get("selector", {}))
        assert len(pods) == 1, f"Service {svc['metadata']['name']} selects {len(pods)} workloads"
        ports = container_ports(pods[0])
        for p in svc["spec"]["ports"]:
            assert p.get("targetPort", p["port"]) in ports, (svc["metadata"]["name"], p)


def test_pdbs_select_pods(objs):
    pdbs = by_kind(objs, "PodDisruptionBudget")
    assert {p["metadata"]["name"] for p in pdbs} >= {"memoryd-shard", "memoryd-router"}
    for pdb in pdbs:
        pods = pods_selected(objs, pdb["spec"]["selector"]["matchLabels"])
        assert len(pods) == 1, pdb["metadata"]["name"]
        assert pdb["spec"].get("maxUnavailable") == 1, pdb["metadata"]["name"]
    assert pods_selected(objs, one(objs, "PodDisruptionBudget", "memoryd-shard")
                         ["spec"]["selector"]["matchLabels"])[0] is shard_set(objs)


def test_workload_selectors_match_templates(objs):
    for w in [o for o in objs if o["kind"] in WORKLOADS]:
        assert selects(w["spec"]["selector"]["matchLabels"],
                       w["spec"]["template"]["metadata"]["labels"]), ident(w)


def test_statefulsets_are_governed_by_headless_services(objs):
    for sts in by_kind(objs, "StatefulSet"):
        svc = one(objs, "Service", sts["spec"]["serviceName"])
        assert svc["spec"].get("clusterIP") == "None", f"{svc['metadata']['name']} is not headless"
        assert pods_selected(objs, svc["spec"]["selector"]) == [sts]
    shards = shard_set(objs)
    assert shards["spec"]["podManagementPolicy"] == "Parallel"
    svc = one(objs, "Service", shards["spec"]["serviceName"])
    assert svc["spec"]["publishNotReadyAddresses"] is True
    (claim,) = shards["spec"]["volumeClaimTemplates"]
    (c,) = shards["spec"]["template"]["spec"]["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]


def probe_ports(c: dict) -> list:
    """The ports a container's probes dial (exec probes: `memoryd health --address`)."""
    out = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(kind)
        if probe is None:
            continue
        for handler in ("grpc", "httpGet", "tcpSocket"):
            if handler in probe:
                out.append(probe[handler]["port"])
        cmd = probe.get("exec", {}).get("command", [])
        if cmd[:2] == ["memoryd", "health"]:
            address = cmd[cmd.index("--address") + 1]
            host, port = address.rsplit(":", 1)
            assert host in ("localhost", "127.0.0.1"), f"{kind} dials {address}, not this pod"
            out.append(int(port))
    return out


def test_probes_dial_container_ports(objs):
    for w in [o for o in objs if o["kind"] in WORKLOADS]:
        ports = container_ports(w)
        for c in w["spec"]["template"]["spec"]["containers"]:
            assert c.get("readinessProbe") and c.get("livenessProbe"), (ident(w), c["name"])
            dialled = probe_ports(c)
            for p in dialled:
                assert p in ports, f"{ident(w)}/{c['name']}: a probe dials {p}, not a port of it"
    (c,) = shard_set(objs)["spec"]["template"]["spec"]["containers"]
    assert c["startupProbe"], "loading the banks takes a while: a startup probe guards liveness"
    assert set(probe_ports(c)) == {container_ports(shard_set(objs))["grpc"]}


def secrets(objs: list[dict]) -> dict[str, set[str]]:
    out = {k: set(v) for k, v in EXTERNAL_SECRETS.items()}
    for s in by_kind(objs, "Secret"):
        out[s["metadata"]["name"]] = set(s.get("stringData", {})) | set(s.get("data", {}))
    return out


def test_config_and_secret_references_exist(objs):
    maps = {m["metadata"]["name"]: set(m.get("data", {})) for m in by_kind(objs, "ConfigMap")}
    known = secrets(objs)
    for w in [o for o in objs if o["kind"] in WORKLOADS]:
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    assert r["key"] in maps.get(r["name"], ()), f"{ident(w)}: {e['name']}: {r}"
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    assert r["key"] in known.get(r["name"], ()), f"{ident(w)}: {e['name']}: {r}"
            assert "envFrom" not in c, "name each variable: the test checks each"
        for v in spec.get("volumes", []):
            if "configMap" in v:
                keys = maps[v["configMap"]["name"]]
                assert all(i["key"] in keys for i in v["configMap"].get("items", [])), v
            if "secret" in v:
                assert v["secret"]["secretName"] in known, v
                assert not v["secret"].get("items"), "mount the whole Secret (its keys are checked)"
        names = {v["name"] for v in spec.get("volumes", [])} | {
            t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in names, f"{ident(w)}/{c['name']} mounts unknown {m['name']}"


def test_secrets_in_the_manifests_are_placeholders():
    doc = README.read_text()
    for name, keys in EXTERNAL_SECRETS.items():
        assert name in doc, f"deploy/README.md does not say how to make Secret {name}"
        assert all(k in doc for k in keys), f"deploy/README.md does not name {name}'s keys"
    for s in by_kind(rendered("base"), "Secret"):
        assert "memoryd.dev/placeholder" in s["metadata"].get("annotations", {}), ident(s)
        assert "data" not in s, "a placeholder holds readable stringData only"
        assert all(PLACEHOLDER in v for v in s["stringData"].values()), ident(s)


def test_shard_count_agrees(objs):
    data = config(objs)
    n = int(data["MEMORYD_NUM_SHARDS"])
    shards = shard_set(objs)
    assert shards["spec"]["replicas"] == n
    router = one(objs, "Deployment", "memoryd-router")
    assert router["spec"]["replicas"] >= 2
    (c,) = router["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    addresses = env["MEMORYD_SHARDS"]["value"].split(",")
    headless = shards["spec"]["serviceName"]
    port = data["GRPC_PORT"]
    assert addresses == [f"{shards['metadata']['name']}-{i}.{headless}.$(POD_NAMESPACE)"
                         f".svc.cluster.local:{port}" for i in range(n)]
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    (sc,) = shards["spec"]["template"]["spec"]["containers"]
    senv = {e["name"]: e for e in sc["env"]}
    assert (senv["MEMORYD_SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
            == "metadata.labels['apps.kubernetes.io/pod-index']")
    assert senv["MEMORYD_NUM_SHARDS"]["valueFrom"]["configMapKeyRef"]["key"] == "MEMORYD_NUM_SHARDS"
    assert senv["MEMORYD_CATALOG_URL"]["valueFrom"]["secretKeyRef"]["name"] == "memoryd-catalog"


def test_ports_and_metrics_annotations(objs):
    data = config(objs)
    for name in ("memoryd-shard", "memoryd-router"):
        w = next(o for o in objs if o["kind"] in WORKLOADS and o["metadata"]["name"] == name)
        ports = container_ports(w)
        assert ports["grpc"] == int(data["GRPC_PORT"]), name
        assert ports["metrics"] == int(data["METRICS_PORT"]), name
        ann = w["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert int(ann["prometheus.io/port"]) == ports["metrics"]
        assert ann["prometheus.io/path"] == "/metrics"


def test_pods_run_restricted(objs):
    for w in [o for o in objs if o["kind"] in WORKLOADS]:
        spec = w["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, ident(w)
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", ident(w)
        assert spec["automountServiceAccountToken"] is False, ident(w)
        # a Service named memoryd would inject MEMORYD_SERVICE_HOST & co.: memoryd's env prefix
        assert spec["enableServiceLinks"] is False, ident(w)
        tmp = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"], ident(w)
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts["/tmp"]["name"] in tmp, ident(w)
            if c["image"].startswith("memoryd"):
                assert mounts["/dev/shm"]["name"] in tmp, ident(w)
                assert mounts["/etc/memoryd/tls"]["readOnly"] is True
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], ident(w)
    (c,) = shard_set(objs)["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"], \
        "shards hold their banks in RAM: request what the limit allows"


def test_grace_period_outlasts_memoryds():
    for objs in map(rendered, NAMES):
        toml = tomllib.loads(config(objs)["memoryd.toml"])
        grace = toml.get("grace_s", cfg.GRACE_S)
        spec = shard_set(objs)["spec"]["template"]["spec"]
        # grace, then the final snapshot of every bank: at least 30 s more
        assert spec["terminationGracePeriodSeconds"] >= grace + 30
        router = one(objs, "Deployment", "memoryd-router")["spec"]["template"]["spec"]
        assert router["terminationGracePeriodSeconds"] > 20      # route --grace's default


# ---- command lines through memoryd's CLI --------------------------------------------------
def resolved_env(objs: list[dict], c: dict, pod_index: int) -> dict[str, str]:
    """The container's env as the kubelet makes it (Secrets: dummy values)."""
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in by_kind(objs, "ConfigMap")}
    ns = by_kind(objs, "Namespace")[0]["metadata"]["name"]
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            for var in VAR.findall(e["value"]):
                assert var in env, f"{e['name']} uses $({var}), not defined before it"
            env[e["name"]] = VAR.sub(lambda m: env[m.group(1)], e["value"])
            continue
        ref = e["valueFrom"]
        if "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            env[e["name"]] = maps[r["name"]][r["key"]]
        elif "secretKeyRef" in ref:
            env[e["name"]] = "postgresql+psycopg://memoryd:dummy@memoryd-postgres:5432/memoryd"
        else:
            path = ref["fieldRef"]["fieldPath"]
            env[e["name"]] = {"metadata.namespace": ns,
                              "metadata.labels['apps.kubernetes.io/pod-index']": str(pod_index),
                              }[path]
    return env


def command_line(c: dict, env: dict[str, str]) -> list[str]:
    argv = [*c.get("command", []), *c.get("args", [])]
    for a in argv:
        for var in VAR.findall(a):
            assert var in env, f"{c['name']}: $({var}) is not in its env (kubelet leaves it as is)"
    return [VAR.sub(lambda m: env[m.group(1)], a) for a in argv]


def parse(argv: list[str]):
    """(command name, click params) of a `memoryd ...` command line; pytest.fail
    naming the options memoryd does not have."""
    import click

    assert argv[0] == "memoryd", argv
    try:
        ctx = memoryd_cli.make_context("memoryd", list(argv[1:]))
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, cmd, rest = memoryd_cli.resolve_command(ctx, rest)
        sub = cmd.make_context(name, rest, parent=ctx)
    except click.UsageError as e:     # NoSuchOption, BadParameter, no such command
        pytest.fail(f"`{' '.join(argv)}` does not parse with memoryd's CLI: {e.format_message()}")
    return name, sub.params


def test_command_lines_parse_with_memoryds_cli(objs, tmp_path):
    shards = shard_set(objs)
    (c,) = shards["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    seen = set()
    for index in (0, shards["spec"]["replicas"] - 1):
        env = resolved_env(objs, c, index)
        name, params = parse(command_line(c, env))
        assert name == "serve"
        assert params["shard_index"] == index
        assert params["num_shards"] == shards["spec"]["replicas"]
        assert params["auth"] is True
        assert params["listen"] == f"0.0.0.0:{container_ports(shards)['grpc']}"
        assert params["metrics_listen"] == f"0.0.0.0:{container_ports(shards)['metrics']}"
        # the Config the pod builds: its TOML from the ConfigMap, TLS files
        # from the Secret's keys, env as the kubelet sets it
        conf_mount = mounts[params.pop("config_file")]
        toml = tmp_path / "memoryd.toml"
        toml.write_text(config(objs)[conf_mount["subPath"]])
        for flag in ("tls_cert", "tls_key", "tls_client_ca"):
            if params[flag] is None:
                continue
            folder, key = params[flag].rsplit("/", 1)
            secret = next(v["secret"]["secretName"] for v in shards["spec"]["template"]["spec"]
                          ["volumes"] if v["name"] == mounts[folder]["name"])
            assert key in secrets(objs)[secret], f"{flag}: {secret} has no key {key}"
            (tmp_path / key).write_text("PEM")
            params[flag] = str(tmp_path / key)
        assert params["data_dir"] in mounts
        params["data_dir"] = str(tmp_path / "data")
        conf = cfg.load(toml, env=env, **params)
        assert (conf.shard_index, conf.num_shards) == (index, shards["spec"]["replicas"])
        assert conf.catalog_url.startswith("postgresql+psycopg://")
        assert conf.auth and conf.tls is not None and conf.shm_bytes == 0
        assert conf.log_level == config(objs)["MEMORYD_LOG_LEVEL"]
        seen.add(name)
    router = one(objs, "Deployment", "memoryd-router")
    (rc,) = router["spec"]["template"]["spec"]["containers"]
    name, params = parse(command_line(rc, resolved_env(objs, rc, 0)))
    assert name == "route"
    assert len(params["shards"].split(",") if isinstance(params["shards"], str)
               else params["shards"]) == shards["spec"]["replicas"]
    assert params["shard_tls_ca"] and params["tls_cert"] and params["tls_key"]
    seen.add(name)
    for w in [o for o in objs if o["kind"] in WORKLOADS]:       # probes' command lines
        for cont in w["spec"]["template"]["spec"]["containers"]:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                cmd = cont.get(kind, {}).get("exec", {}).get("command", [])
                if cmd[:1] == ["memoryd"]:
                    name, params = parse(cmd)
                    assert name == "health" and params["tls_ca"], (ident(w), kind)
                    assert params["tls_ca"].startswith("/etc/memoryd/tls/")
                    assert params["tls_ca"].rsplit("/", 1)[1] in EXTERNAL_SECRETS["memoryd-tls"]
                    seen.add(name)
    assert seen == {"serve", "route", "health"}
