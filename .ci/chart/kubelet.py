"""Runs what the chart renders: a kubelet and a StatefulSet controller played
on loopback, with the release binary.

The chart is rendered with helm/deltasync/ci/run-values.yaml (a primary, two
replicas, one synchronous). From the rendered StatefulSet, Services and
probes, for each pod ordinal N this builds the container as Kubernetes
would and runs it:

- argv: the container's `command` or else the image's ENTRYPOINT (read
  from the Dockerfile), then `args`, with `$(VAR)` expanded from the
  container's env as the kubelet does (`$$` escapes, unknown names stay);
  env: the Dockerfile's ENV, then the manifest's env in order (downward API
  `fieldRef`s for metadata.name / metadata.namespace / status.podIP,
  `secretKeyRef`s), plus HOSTNAME;
- each pod gets its own address 127.0.0.(N+2), and the pods' /etc/hosts maps
  every headless name (<pod>.<headless>.<ns>.svc.<domain>) to them, as
  cluster DNS with publishNotReadyAddresses would;
- volumes: the claim template gives each ordinal a directory that outlives
  its pod (owned by fsGroup); secret volumes are written to temp dirs
  honouring `items`; each is bound at its mountPath in a private mount
  namespace (.ci/chart/podinit.py), over a read-only root that holds only
  the binary, its libraries and /etc; the server runs as runAsUser /
  runAsGroup with fsGroup, no_new_privs, and no capabilities.

Then it probes each pod as its probes say (gRPC health, port, service,
periodSeconds, timeoutSeconds, thresholds; readiness and liveness only once
startup succeeded; a failed liveness or startup restarts the container),
keeps the client Service's endpoints as the ready pods, and checks:

1. every pod becomes ready; pod 0 is the primary, the others its replicas;
2. writes through the client Service's pods are read back from every pod;
3. pod 0 killed (SIGKILL) and recreated as the StatefulSet would (same name,
   address and volume): ready again, nothing acknowledged lost;
4. a rolling restart in the StatefulSet's order (highest ordinal first, each
   pod SIGTERMed, given terminationGracePeriodSeconds, then replaced, the
   next only once it is ready) while a writer pushes through the client
   Service: every acknowledged write is on every pod afterwards, and every
   read sent to a pod that was ready (and not terminating) was served;
5. the `helm test` pod's script, run against the release.

What it does not reproduce: the pods share the host's network namespace
(`--listen 0.0.0.0:P` is bound on the pod's own address instead, the only
argument rewritten); the Service VIP and kube-proxy (clients pick a ready
endpoint themselves); cgroup limits (resources), seccomp and the
capability bounding set (the server runs without capabilities as a
non-root user, with no_new_privs); image layers (the root holds the host's
libraries for the binary, and no shell); DNS beyond /etc/hosts.

Usage (as root, from the repository root): python .ci/chart/kubelet.py BINARY
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import dockerfile
import grpc
import helm_python as helm
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "deltasync"
RELEASE, NAMESPACE = "rc", "ci"
WORK = pathlib.Path(tempfile.mkdtemp(prefix="deltasync-kubelet-"))
os.chmod(WORK, 0o755)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def protos():
    """Python stubs for the sync and admin services, generated from proto/."""
    import grpc_tools
    from grpc_tools import protoc

    out = WORK / "gen"
    out.mkdir()
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    for name in ("sync", "admin"):
        rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}",
                          f"deltasync/v1/{name}.proto"])
        assert rc == 0, f"protoc {name}"
    sys.path.insert(0, str(out))
    from deltasync.v1 import admin_pb2, admin_pb2_grpc, sync_pb2, sync_pb2_grpc

    return sync_pb2, sync_pb2_grpc, admin_pb2, admin_pb2_grpc


sync_pb2, sync_pb2_grpc, admin_pb2, admin_pb2_grpc = protos()


def image_config() -> tuple[list[str], dict[str, str], str]:
    """ENTRYPOINT, ENV and USER of the Dockerfile's final stage."""
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    start = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    entrypoint, env, user = [], {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, "0"
    for c in commands[start:]:
        if c.cmd == "ENTRYPOINT":
            entrypoint = list(c.value)
        elif c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2]))
        elif c.cmd == "USER":
            user = c.value[0]
    return entrypoint, env, user


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: `$$` is `$`, unknown references stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def health(addr: str, service: str, timeout: float) -> bool:
    """A kubelet gRPC probe: success only on SERVING within the timeout."""
    try:
        with grpc.insecure_channel(addr) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


class Pod:
    """One pod of the StatefulSet, its container and the kubelet's view of it."""

    def __init__(self, cluster: "Cluster", ordinal: int):
        self.cluster, self.ordinal = cluster, ordinal
        self.name = f"{cluster.sts['metadata']['name']}-{ordinal}"
        self.ip = f"127.0.0.{ordinal + 2}"
        self.process: subprocess.Popen | None = None
        self.started = self.ready = self.terminating = False
        self.restarts = 0
        self.expected_exit = False
        self.unexpected_exits: list[int] = []
        self.lock = threading.Lock()
        self.stop_probing = threading.Event()
        self.prober: threading.Thread | None = None
        self.log_path = WORK / f"{self.name}.log"
        # The claim template's volume: one per ordinal, kept across pods.
        self.claims = {}
        for template in cluster.sts["spec"].get("volumeClaimTemplates", []):
            claim = WORK / "pvc" / f"{template['metadata']['name']}-{self.name}"
            claim.mkdir(parents=True, exist_ok=True)
            fs_group = cluster.pod_spec["securityContext"].get("fsGroup")
            if fs_group is not None:
                os.chown(claim, 0, fs_group)
                os.chmod(claim, 0o2770)
            self.claims[template["metadata"]["name"]] = claim

    def addr(self, port_name: str = "grpc") -> str:
        return f"{self.ip}:{self.cluster.ports[port_name]}"

    def env(self) -> dict[str, str]:
        env = dict(self.cluster.image_env)
        env["HOSTNAME"] = self.name
        fields = {"metadata.name": self.name, "metadata.namespace": NAMESPACE, "status.podIP": self.ip}
        for var in self.cluster.container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
            elif "fieldRef" in var["valueFrom"]:
                env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in var["valueFrom"]:
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.cluster.secrets[ref["name"]][ref["key"]]
            else:
                raise SystemExit(f"env {var['name']}: unsupported source {var['valueFrom']}")
        return env

    def argv(self, env: dict[str, str]) -> list[str]:
        container = self.cluster.container
        command = container.get("command") or self.cluster.entrypoint
        args = [expand(a, env) for a in command + container.get("args", [])]
        # The one rewrite: the pod's network namespace is its own address here.
        args = [re.sub(r"=(0\.0\.0\.0|\[::\]):", f"={self.ip}:", a) for a in args]
        binary = args[0] if args[0].startswith("/") else next(
            f"{d}/{args[0]}" for d in env["PATH"].split(":") if d == "/usr/local/bin")
        return [binary, *args[1:]]

    def volumes(self) -> list[dict]:
        mounts = []
        volumes = {v["name"]: v for v in self.cluster.pod_spec.get("volumes") or []}
        for m in self.cluster.container.get("volumeMounts", []):
            if m["name"] in self.claims:
                source = self.claims[m["name"]]
            elif "secret" in volumes[m["name"]]:
                secret = volumes[m["name"]]["secret"]
                data = self.cluster.secrets[secret["secretName"]]
                source = WORK / "secrets" / self.name / m["name"]
                shutil.rmtree(source, ignore_errors=True)
                source.mkdir(parents=True)
                for item in secret.get("items") or [{"key": k, "path": k} for k in data]:
                    (source / item["path"]).write_text(data[item["key"]])
                    os.chmod(source / item["path"], 0o644)
            elif "emptyDir" in volumes[m["name"]]:
                source = WORK / "emptydir" / self.name / m["name"]
                source.mkdir(parents=True, exist_ok=True)
                os.chmod(source, 0o1777)
            else:
                raise SystemExit(f"volume {m['name']}: unsupported source")
            mounts.append({"source": str(source), "path": m["mountPath"], "read_only": m.get("readOnly", False)})
        return mounts

    def start(self) -> None:
        """Creates the container and starts probing it."""
        env = self.env()
        argv = self.argv(env)
        security = {**self.cluster.pod_spec.get("securityContext", {}), **self.cluster.container.get("securityContext", {})}
        uid, gid = security["runAsUser"], security.get("runAsGroup", 0)
        assert security.get("runAsNonRoot") and uid != 0, "the pod must run as non-root"
        groups = sorted({gid, *([security["fsGroup"]] if "fsGroup" in security else []),
                         *security.get("supplementalGroups", [])})
        spec = {
            "root": str(WORK / "roots" / self.name),
            "symlinks": self.cluster.lib_links, "lib_dirs": self.cluster.lib_dirs,
            "binary": self.cluster.binary, "binary_path": argv[0],
            "etc": {"hosts": self.cluster.hosts, "nsswitch.conf": "hosts: files\n",
                    "passwd": "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
                    "group": "root:x:0:\nnonroot:x:65532:\n", "resolv.conf": ""},
            "mounts": self.volumes(), "uid": uid, "gid": gid, "groups": groups,
            "no_new_privs": security.get("allowPrivilegeEscalation") is False,
            "read_only_root": security.get("readOnlyRootFilesystem", False),
            "argv": argv, "env": env,
        }
        assert spec["read_only_root"], "the chart asks for a read-only root"
        spec_path = WORK / f"{self.name}.json"
        spec_path.write_text(json.dumps(spec))
        with open(self.log_path, "a") as out:
            out.write(f"--- start {' '.join(argv)}\n")
            out.flush()
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                 str(pathlib.Path(__file__).with_name("podinit.py")), str(spec_path)],
                stdout=out, stderr=subprocess.STDOUT, env={"PATH": os.environ["PATH"]})
        with self.lock:
            self.started = self.ready = self.terminating = False
            self.expected_exit = False
        self.stop_probing = threading.Event()
        self.prober = threading.Thread(target=self.probe_loop, args=(self.process, self.stop_probing), daemon=True)
        self.prober.start()

    def probe_loop(self, process: subprocess.Popen, stop: threading.Event) -> None:
        """The kubelet's probe workers for one container."""
        c = self.cluster.container
        probes = {kind: c[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness") if f"{kind}Probe" in c}
        due = {kind: time.monotonic() + p.get("initialDelaySeconds", 0) for kind, p in probes.items()}
        failures = {kind: 0 for kind in probes}
        successes = {kind: 0 for kind in probes}
        while not stop.is_set():
            if process.poll() is not None:
                with self.lock:
                    self.ready = False
                    if not self.expected_exit:
                        self.unexpected_exits.append(process.returncode)
                        log(f"{self.name} exited unexpectedly ({process.returncode}); restarting")
                if not self.expected_exit:
                    threading.Thread(target=self.restart, daemon=True).start()
                return
            now = time.monotonic()
            for kind, p in probes.items():
                if now < due[kind] or (kind != "startup" and not self.started) or (kind == "startup" and self.started):
                    continue
                due[kind] = now + p.get("periodSeconds", 10)
                port = p["grpc"]["port"]
                ok = health(f"{self.ip}:{port}", p["grpc"].get("service", ""), p.get("timeoutSeconds", 1))
                failures[kind] = 0 if ok else failures[kind] + 1
                successes[kind] = successes[kind] + 1 if ok else 0
                with self.lock:
                    if kind == "startup" and ok:
                        self.started = True
                        # Readiness and liveness start right after startup succeeds.
                        due["readiness"] = due["liveness"] = now
                    elif kind == "readiness":
                        if successes[kind] >= p.get("successThreshold", 1):
                            self.ready = True
                        elif failures[kind] >= p.get("failureThreshold", 3):
                            self.ready = False
                if kind in ("startup", "liveness") and failures[kind] >= p.get("failureThreshold", 3):
                    log(f"{self.name}: {kind} probe failed {failures[kind]} times; restarting the container")
                    self.unexpected_exits.append(-1)
                    self.stop(signal.SIGKILL, 0)
                    threading.Thread(target=self.start, daemon=True).start()
                    return
            stop.wait(0.1)

    def restart(self) -> None:
        self.restarts += 1
        time.sleep(1)  # the kubelet's restart back-off, shortened
        self.start()

    def stop(self, sig: int, grace: float) -> int | None:
        """Terminates the container as the kubelet does: `sig`, then SIGKILL after `grace`."""
        with self.lock:
            self.terminating, self.ready, self.expected_exit = True, False, True
        self.stop_probing.set()
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(sig)
        if sig == signal.SIGKILL:
            return process.wait()
        try:
            return process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log(f"{self.name}: still running after {grace}s; SIGKILL")
            process.kill()
            return process.wait()

    def check_runtime(self) -> None:
        """What the image and securityContext promise, seen from the kernel:
        the server runs as the pod's user, its root is read-only and only
        the data volume is writable."""
        pid = self.process.pid
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
        caps = re.search(r"^CapEff:\s+(\w+)", status, re.M).group(1)
        nnp = re.search(r"^NoNewPrivs:\s+(\d)", status, re.M).group(1)
        assert (uid, int(caps, 16), nnp) == ("65532", 0, "1"), (uid, caps, nnp)
        writable = []
        for line in pathlib.Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[5].split(",")[0] == "rw" and fields[4] not in ("/dev",) and not fields[4].startswith("/dev/"):
                writable.append(fields[4])
        assert writable == ["/data"], f"{self.name}: writable mounts {writable}"
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in self.claims["data"].rglob("*")}
        assert owners <= {(65532, 65532)}, owners

    def serving(self) -> bool:
        with self.lock:
            return self.ready and not self.terminating


class Cluster:
    def __init__(self, binary: str, values: dict, secrets: dict[str, dict[str, str]]):
        chart = helm.Chart.load(CHART)
        rendered = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
        objects = [o for path, text in rendered.items() if not path.endswith("NOTES.txt")
                   for o in yaml.safe_load_all(text) if isinstance(o, dict)]
        self.objects = objects
        (self.sts,) = [o for o in objects if o["kind"] == "StatefulSet"]
        self.services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
        self.test_pod = next((o for o in objects if o["kind"] == "Pod"), None)
        self.pod_spec = self.sts["spec"]["template"]["spec"]
        (self.container,) = self.pod_spec["containers"]
        self.ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.entrypoint, self.image_env, _ = image_config()
        self.secrets = secrets
        self.binary = binary
        libs = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
        paths = re.findall(r"(/\S+\.so[.\d]*)", libs)
        self.lib_dirs = sorted({os.path.dirname(os.path.realpath(p)) for p in paths})
        self.lib_links = {"/lib": "usr/lib", "/lib64": "usr/lib64"} if os.path.islink("/lib") else {}
        if os.path.islink("/lib64"):
            self.lib_dirs.append(os.path.realpath("/lib64"))
        headless = self.sts["spec"]["serviceName"]
        assert self.services[headless]["spec"]["clusterIP"] == "None"
        assert self.services[headless]["spec"]["publishNotReadyAddresses"]
        self.replicas = self.sts["spec"]["replicas"]
        domain = values.get("clusterDomain", "cluster.local")
        lines = ["127.0.0.1 localhost"]
        for n in range(self.replicas):
            pod = f"{self.sts['metadata']['name']}-{n}"
            lines.append(f"127.0.0.{n + 2} {pod}.{headless}.{NAMESPACE}.svc.{domain} {pod}.{headless}.{NAMESPACE}.svc {pod}.{headless}")
        self.hosts = "\n".join(lines) + "\n"
        self.pods = [Pod(self, n) for n in range(self.replicas)]
        self.grace = self.pod_spec.get("terminationGracePeriodSeconds", 30)

    def endpoints(self) -> list[Pod]:
        """The client Service's endpoints: pods that are ready and not terminating."""
        return [p for p in self.pods if p.serving()]

    def wait_ready(self, pods: list[Pod], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not all(p.serving() for p in pods):
            if time.monotonic() > deadline:
                for p in pods:
                    print(f"--- {p.name} (ready={p.ready})\n{p.log_path.read_text()[-3000:]}")
                raise SystemExit(f"not ready within {seconds}s: {[p.name for p in pods if not p.serving()]}")
            time.sleep(0.1)

    def shutdown(self) -> None:
        for p in self.pods:
            p.stop(signal.SIGKILL, 5)


class Client:
    """Pushes and reads through the client Service (a ready endpoint per call)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.channels: dict[str, grpc.Channel] = {}
        self.acked: dict[str, int] = {}  # document id -> its value, acknowledged
        self.checkpoint = 0
        self.lock = threading.Lock()
        self.next_mutation = 1

    def stub(self, pod: Pod, kind=None):
        channel = self.channels.get(pod.ip) or self.channels.setdefault(pod.ip, grpc.insecure_channel(pod.addr()))
        return (kind or sync_pb2_grpc.SyncServiceStub)(channel)

    def put(self, doc: str, value: int, deadline: float) -> None:
        """One acknowledged write, retried with the same mutation id until then."""
        with self.lock:
            mutation_id, self.next_mutation = self.next_mutation, self.next_mutation + 1
        request = sync_pb2.PushRequest(client_id="kubelet-check", mutations=[sync_pb2.Mutation(
            mutation_id=mutation_id, collection="ci", id=doc, put=_struct({"value": value}))])
        last = None
        while time.monotonic() < deadline:
            endpoints = self.cluster.endpoints()
            if endpoints:
                try:
                    reply = self.stub(random.choice(endpoints)).Push(request, timeout=10)
                    outcome = reply.results[0].outcome
                    assert outcome in (sync_pb2.OUTCOME_APPLIED, sync_pb2.OUTCOME_DUPLICATE), reply
                    with self.lock:
                        self.acked[doc] = value
                        self.checkpoint = max(self.checkpoint, reply.checkpoint)
                    return
                except grpc.RpcError as e:
                    last = e.code()
            time.sleep(0.1)
        raise SystemExit(f"write {doc} not acknowledged in time (last: {last})")

    def verify_everywhere(self) -> None:
        """Every acknowledged write, read back from every pod."""
        with self.lock:
            acked, checkpoint = dict(self.acked), self.checkpoint
        for pod in self.cluster.pods:
            ids = sorted(acked)
            found = {}
            for i in range(0, len(ids), 200):
                reply = self.stub(pod).Get(sync_pb2.GetRequest(collection="ci", ids=ids[i:i + 200], min_checkpoint=checkpoint), timeout=10)
                found.update({d.id: int(d.body["value"]) for d in reply.documents if not d.deleted})
            missing = {d: v for d, v in acked.items() if found.get(d) != v}
            assert not missing, f"{pod.name} lacks acknowledged writes: {sorted(missing)[:10]}"
        log(f"all {len(acked)} acknowledged writes read back from every pod (checkpoint {checkpoint})")

    def roles(self) -> list[str]:
        return [admin_pb2.Role.Name(self.stub(p, admin_pb2_grpc.AdminServiceStub).Status(
            admin_pb2.StatusRequest(), timeout=5).role) for p in self.cluster.pods]


def _struct(value: dict):
    from google.protobuf import struct_pb2

    s = struct_pb2.Struct()
    s.update(value)
    return s


def rolling_restart(cluster: Cluster, client: Client) -> None:
    """The StatefulSet controller's RollingUpdate, while a writer and a reader run."""
    stop = threading.Event()
    errors: list[str] = []
    reads = {"served": 0, "refused_by_ready_pod": 0}

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            try:
                client.put(f"roll-{n}", n, time.monotonic() + 60)
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(f"writer: {e}")
                return

    def reader():
        while not stop.is_set():
            endpoints = cluster.endpoints()
            if not endpoints:
                time.sleep(0.05)
                continue
            pod = random.choice(endpoints)
            try:
                client.stub(pod).Get(sync_pb2.GetRequest(collection="ci", ids=["first-0"]), timeout=5)
                reads["served"] += 1
            except grpc.RpcError as e:
                if pod.serving():  # still in the endpoints after the failure
                    reads["refused_by_ready_pod"] += 1
                    errors.append(f"read from ready {pod.name}: {e.code()}")
            time.sleep(0.01)

    threads = [threading.Thread(target=writer, daemon=True), threading.Thread(target=reader, daemon=True)]
    for t in threads:
        t.start()
    partition = cluster.sts["spec"]["updateStrategy"].get("rollingUpdate", {}).get("partition", 0)
    policy = cluster.sts["spec"]["updateStrategy"]["type"]
    assert policy == "RollingUpdate", policy
    order = [p for p in reversed(cluster.pods) if p.ordinal >= partition]
    log(f"rolling restart in the StatefulSet's order: {[p.name for p in order]}")
    for pod in order:
        began = time.monotonic()
        code = pod.stop(signal.SIGTERM, cluster.grace)
        if code != 0:
            errors.append(f"{pod.name} exited {code} on SIGTERM")
        pod.start()
        cluster.wait_ready([pod], 120)
        log(f"  {pod.name} replaced and ready in {time.monotonic() - began:.1f}s; {len(client.acked)} writes acknowledged so far")
    stop.set()
    for t in threads:
        t.join(70)
    assert not errors, errors
    log(f"reads during the restart: {reads['served']} served, {reads['refused_by_ready_pod']} refused by ready pods")


def run_test_pod(cluster: Cluster) -> None:
    """The `helm test` pod's script, with the Service name resolved to a ready endpoint."""
    pod = cluster.test_pod
    if pod is None:
        return
    (container,) = pod["spec"]["containers"]
    env = {"PATH": os.environ["PATH"]}
    for var in container["env"]:
        env[var["name"]] = var["value"]
    service = cluster.services[env["ADDR"].split(":")[0]]
    assert service["spec"]["selector"].items() <= cluster.sts["spec"]["template"]["metadata"]["labels"].items()
    env["ADDR"] = random.choice(cluster.endpoints()).addr()
    out = subprocess.run(container["command"] + container["args"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"helm test pod failed:\n{out.stdout}\n{out.stderr}"
    log("the helm test pod's script passed")


def main() -> int:
    binary = os.path.realpath(sys.argv[1])
    assert os.geteuid() == 0, "the emulation needs root (mount namespaces); the server itself runs as 65532"
    values = yaml.safe_load((CHART / "ci" / "run-values.yaml").read_text())
    began = time.monotonic()
    cluster = Cluster(binary, values, secrets={})
    client = Client(cluster)
    try:
        policy = cluster.sts["spec"]["podManagementPolicy"]
        log(f"starting {cluster.replicas} pods ({policy})")
        for pod in cluster.pods:
            pod.start()
            if policy == "OrderedReady":
                cluster.wait_ready([pod], 120)
        cluster.wait_ready(cluster.pods, 120)
        roles = client.roles()
        log(f"all pods ready in {time.monotonic() - began:.1f}s; roles {roles}")
        for pod in cluster.pods:
            pod.check_runtime()
        log("each server runs as 65532 with no capabilities and no_new_privs; only /data is writable")
        assert roles == ["ROLE_PRIMARY"] + ["ROLE_REPLICA"] * (cluster.replicas - 1), roles

        deadline = time.monotonic() + 60
        for n in range(50):
            client.put(f"first-{n}", n, deadline)
        client.verify_everywhere()

        log("SIGKILL pod 0; the StatefulSet recreates it (same name, address and volume)")
        pod0 = cluster.pods[0]
        pod0.stop(signal.SIGKILL, 0)
        pod0.start()
        cluster.wait_ready([pod0], 120)
        deadline = time.monotonic() + 60
        for n in range(20):
            client.put(f"after-kill-{n}", n, deadline)
        client.verify_everywhere()

        rolling_restart(cluster, client)
        client.verify_everywhere()
        roles = client.roles()
        assert roles == ["ROLE_PRIMARY"] + ["ROLE_REPLICA"] * (cluster.replicas - 1), roles
        run_test_pod(cluster)
        unexpected = {p.name: p.unexpected_exits for p in cluster.pods if p.unexpected_exits}
        assert not unexpected, f"containers that exited unexpectedly: {unexpected}"
        log(f"run check passed in {time.monotonic() - began:.1f}s")
        return 0
    finally:
        cluster.shutdown()
        if os.environ.get("KEEP_WORK"):
            print(f"work dir kept: {WORK}")
        else:
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
