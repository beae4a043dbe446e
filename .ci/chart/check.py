"""Static checks of the chart and the Dockerfile (no cluster, no Docker daemon).

- Chart.yaml's appVersion is Cargo.toml's version.
- `helm lint --strict` and a render for every values file in
  helm/deltasync/ci/ (Helm v4 through helm-python-sdk, no helm binary).
- Every rendered manifest validated with kubernetes-validate --strict
  against a current Kubernetes; the CRD kinds (ServiceMonitor,
  Certificate) have no schema there, so their required fields are checked
  here by hand.
- Invariants a platform team relies on (security context, probes, the
  StatefulSet's update order, the names of §3 of the chart's issue).
- Bad values fail at render time with a message naming them.
- The Dockerfile, parsed by the official parser (the `dockerfile` package).

Usage: python .ci/chart/check.py  (from the repository root)
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
import tomllib

import dockerfile
import helm_python as helm
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "deltasync"
KUBE_VERSION = "1.34.0"
RELEASE, NAMESPACE = "rc", "ci"
failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)
    print(f"FAIL {message}")


def check(condition: bool, message: str) -> None:
    if not condition:
        fail(message)


def values_files() -> dict[str, dict]:
    files = {}
    for path in sorted((CHART / "ci").glob("*-values.yaml")):
        files[path.name] = yaml.safe_load(path.read_text()) or {}
    return files


def render(chart: helm.Chart, values: dict) -> dict[str, list[dict]]:
    """Template path -> the objects it renders (NOTES.txt left out)."""
    out = {}
    for path, text in chart.render(values=values, name=RELEASE, namespace=NAMESPACE).items():
        if path.endswith("NOTES.txt"):
            continue
        out[path] = [doc for doc in yaml.safe_load_all(text) if doc]
    return out


CRD_REQUIRED = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["spec.selector", "spec.endpoints"],
    ("cert-manager.io/v1", "Certificate"): ["spec.secretName", "spec.issuerRef.name", "spec.dnsNames"],
}


def validate(obj: dict, where: str) -> None:
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_REQUIRED:
        for dotted in CRD_REQUIRED[key]:
            node = obj
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            check(bool(node), f"{where}: {key[1]} lacks {dotted}")
        return
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        fail(f"{where}: {obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError:
        fail(f"{where}: no schema for {key} in Kubernetes {KUBE_VERSION}")


def invariants(name: str, objects: list[dict], values: dict) -> None:
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    (sts,) = by_kind["StatefulSet"]
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    check(spec["updateStrategy"]["type"] == "RollingUpdate", f"{name}: updateStrategy")
    check(spec["serviceName"] == f"{RELEASE}-deltasync-headless", f"{name}: serviceName")
    sec, psec = container["securityContext"], pod["securityContext"]
    check(sec["readOnlyRootFilesystem"] is True, f"{name}: readOnlyRootFilesystem")
    check(sec["allowPrivilegeEscalation"] is False, f"{name}: allowPrivilegeEscalation")
    check(sec["capabilities"]["drop"] == ["ALL"], f"{name}: capabilities")
    check(psec["runAsNonRoot"] and psec["fsGroup"] == 65532, f"{name}: runAsNonRoot/fsGroup")
    check(psec["seccompProfile"]["type"] == "RuntimeDefault", f"{name}: seccompProfile")
    args = container["args"]
    check(not container.get("command"), f"{name}: the image's ENTRYPOINT runs (no shell)")
    check("--pod-name=$(POD_NAME)" in args, f"{name}: role derived from the pod name")
    grace = next(a for a in args if a.startswith("--shutdown-grace="))
    check(pod["terminationGracePeriodSeconds"] > int(grace.split("=")[1].rstrip("s")), f"{name}: grace")
    tls = values.get("tls", {}).get("enabled", False)
    port = 8081 if tls else 50051
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check(container[probe]["grpc"]["port"] == port, f"{name}: {probe} port {port}")
    check(container["readinessProbe"]["grpc"]["service"] == "deltasync.v1.SyncService", f"{name}: readiness service")
    check("service" not in container["livenessProbe"]["grpc"], f"{name}: liveness on the empty service")
    headless = [s for s in by_kind["Service"] if s["spec"].get("clusterIP") == "None" and s["metadata"]["name"].endswith("-headless")]
    check(len(headless) == 1 and headless[0]["spec"]["publishNotReadyAddresses"], f"{name}: headless Service")
    check("PodDisruptionBudget" in by_kind, f"{name}: PodDisruptionBudget")
    # The names tools outside the project rely on (§3).
    replicas = values.get("replicaCount", 1)
    check(spec["replicas"] == replicas, f"{name}: replicaCount")
    check(f"--sync-replicas={values.get('syncReplicas', 0)}" in args, f"{name}: syncReplicas")
    claim = spec["volumeClaimTemplates"][0]["spec"]
    persistence = values.get("persistence", {})
    check(claim["resources"]["requests"]["storage"] == persistence.get("size", "10Gi"), f"{name}: persistence.size")
    if persistence.get("storageClass"):
        check(claim["storageClassName"] == persistence["storageClass"], f"{name}: persistence.storageClass")
    check(("ServiceMonitor" in by_kind) == values.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False), f"{name}: ServiceMonitor")
    check(("NetworkPolicy" in by_kind) == values.get("networkPolicy", {}).get("enabled", False), f"{name}: NetworkPolicy")
    if values.get("auth", {}).get("enabled"):
        check(any(a.startswith("--auth-file=") for a in args), f"{name}: auth file")
        check(any(v.get("secret", {}).get("secretName") == values["auth"]["secretName"] for v in pod["volumes"]), f"{name}: auth.secretName")
    if tls:
        check(any(a.startswith("--replicate-from=https://") for a in args), f"{name}: replicas follow over https")
    if values.get("metrics", {}).get("enabled"):
        check(any(a.startswith("--metrics-listen=") for a in args), f"{name}: --metrics-listen")
        if values["metrics"].get("dashboard", {}).get("enabled", True):
            boards = [c for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"].endswith("-dashboard")]
            check(len(boards) == 1, f"{name}: the Grafana dashboard ConfigMap")
            for board in boards:
                for text in board["data"].values():
                    check("deltasync_push_mutations_total" in json.loads(text).__repr__(), f"{name}: the dashboard JSON")


# Values that must fail, and a piece of the message that must say why.
BAD_VALUES = [
    ({"replicaCount": -1}, "replicaCount"),
    ({"server": {"durability": "sometimes"}}, "durability"),
    ({"persistance": {"size": "1Gi"}}, "persistance"),
    ({"persistence": {"sise": "1Gi"}}, "sise"),
    ({"server": {"conflictStrategy": {"default": "last_wins"}}}, "conflictStrategy"),
    ({"retention": {"history": "a week"}}, "history"),
    ({"replicaCount": 2, "syncReplicas": 2}, "syncReplicas (2) must be below replicaCount (2)"),
    ({"primaryOrdinal": 1}, "primaryOrdinal (1) must be below replicaCount (1)"),
    ({"terminationGracePeriodSeconds": 10}, "terminationGracePeriodSeconds (10) must be at least"),
    ({"tls": {"enabled": True}}, "tls.enabled needs tls.secretName"),
    ({"auth": {"enabled": True}}, "auth.enabled needs auth.secretName"),
    ({"metrics": {"serviceMonitor": {"enabled": True}}}, "metrics.serviceMonitor.enabled needs metrics.enabled"),
]


def main() -> int:
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    check(chart_meta["appVersion"] == cargo["package"]["version"], "Chart.yaml appVersion != Cargo.toml version")
    json.loads((CHART / "values.schema.json").read_text())

    chart = helm.Chart.load(CHART)
    for name, values in values_files().items():
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        check(not problems, f"lint {name}: {problems}")
        rendered = render(chart, values)
        objects = [obj for objs in rendered.values() for obj in objs]
        for path, objs in rendered.items():
            for obj in objs:
                validate(obj, f"{name} {path}")
        invariants(name, [o for o in objects if "helm.sh/hook" not in o["metadata"].get("annotations", {})], values)
        kinds = sorted(f"{o['kind']}" for o in objects)
        print(f"ok   {name}: lint clean; {len(objects)} objects valid ({', '.join(kinds)})")

    for values, expected in BAD_VALUES:
        try:
            chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
            fail(f"bad values rendered: {values}")
        except helm.HelmError as e:
            message = str(e)
            check(expected in message, f"bad values {values}: message does not say {expected!r}: {message}")
            print(f"ok   refused {json.dumps(values)}: {message.splitlines()[-1][:160]}")

    check_dockerfile()
    if failures:
        print(f"{len(failures)} chart check(s) failed")
        return 1
    return 0


def check_dockerfile() -> None:
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    stages = [c for c in commands if c.cmd == "FROM"]
    check(len(stages) >= 2, "Dockerfile: multi-stage")
    check(re.match(r"docker.io/library/rust:", stages[0].value[0]) is not None, "Dockerfile: a Rust builder")
    runtime = stages[-1].value[0]
    check("distroless/cc" in runtime or "slim" in runtime, f"Dockerfile: minimal runtime ({runtime})")
    final = commands[commands.index(stages[-1]):]
    by = lambda cmd: [c for c in final if c.cmd == cmd]  # noqa: E731
    copies = by("COPY")
    check(all(any(f.startswith("--from=") for f in c.flags) for c in copies), "Dockerfile: the runtime stage copies only from the builder")
    check([c.value[-1] for c in copies] == ["/usr/local/bin/deltasync", "/data"], f"Dockerfile: only the binary and /data ({[c.value for c in copies]})")
    check(not by("RUN"), "Dockerfile: nothing runs in the runtime stage (no shell there)")
    (user,) = by("USER")
    check(user.value[0] == "65532:65532", "Dockerfile: USER 65532")
    (entry,) = by("ENTRYPOINT")
    check(entry.json and list(entry.value) == ["deltasync"], "Dockerfile: ENTRYPOINT [\"deltasync\"]")
    labels = " ".join(" ".join(c.value) for c in by("LABEL"))
    for label in ("title", "version", "revision", "source", "licenses"):
        check(f"org.opencontainers.image.{label}" in labels, f"Dockerfile: OCI label {label}")
    volumes = [v for c in by("VOLUME") for v in c.value]
    check(volumes == ["/data"], "Dockerfile: /data is the only volume")
    ignore = (ROOT / ".dockerignore").read_text().split()
    check(ignore[ignore.index("*") + 1:] == ["!Cargo.toml", "!Cargo.lock", "!build.rs", "!proto/", "!src/"] if "*" in ignore else False,
          ".dockerignore: everything but the build's inputs")
    print(f"ok   Dockerfile: {len(stages)} stages, runtime {runtime}, USER {user.value[0]}, ENTRYPOINT {list(entry.value)}")


if __name__ == "__main__":
    sys.exit(main())
