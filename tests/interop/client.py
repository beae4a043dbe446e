"""Interop check: a Python client generated from proto/ drives a running server.

Usage: client.py HOST:PORT   (the generated deltasync/v1/sync_pb2*.py on sys.path)

Covers the conflict and idempotency rules from the outside, plus health and
both reflection versions. Exits non-zero on the first broken rule.
"""

import sys
import uuid

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from deltasync.v1 import sync_pb2 as pb
from deltasync.v1 import sync_pb2_grpc

target = sys.argv[1]
channel = grpc.insecure_channel(target)
stub = sync_pb2_grpc.SyncServiceStub(channel)
# Each run uses its own collection, so reruns against one store stay independent.
coll = "interop_" + uuid.uuid4().hex[:8]


def body(**fields):
    s = struct_pb2.Struct()
    s.update(fields)
    return s


def push(client_id, *mutations, atomic=False):
    return stub.Push(pb.PushRequest(client_id=client_id, mutations=list(mutations), atomic=atomic))


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


O = pb.Outcome

# Create/create conflict.
r = push("py-a", pb.Mutation(collection=coll, id="t", base_version=0, put=body(title="t1", description="d1")))
check(r.results[0].outcome == O.OUTCOME_APPLIED and r.results[0].document.version == 1, "create applies at version 1")
r = push("py-b", pb.Mutation(collection=coll, id="t", base_version=0, put=body(title="other")))
check(r.results[0].outcome == O.OUTCOME_CONFLICT, "second create conflicts")

# Disjoint fields merge; overlapping fields under each strategy.
push("", pb.Mutation(collection=coll, id="t", base_version=1, patch=body(done=False)))  # version 2
push("py-a", pb.Mutation(collection=coll, id="t", base_version=2, patch=body(description="dA")))  # version 3
r = push("py-b", pb.Mutation(collection=coll, id="t", base_version=2, patch=body(title="tB")))
doc = r.results[0].document
check(r.results[0].outcome == O.OUTCOME_MERGED and doc.version == 4, "disjoint stale change merges at version 4")
check(doc.body["title"] == "tB" and doc.body["description"] == "dA", "merged document has both changes")

stale = pb.Mutation(collection=coll, id="t", base_version=2, patch=body(title="late", extra=1))
r = push("", stale)
check(r.results[0].outcome == O.OUTCOME_CONFLICT and list(r.results[0].conflicting_fields) == ["title"], "overlap rejected by default")
stale.on_conflict = pb.CONFLICT_STRATEGY_SERVER_WINS
r = push("", stale)
d = r.results[0].document
check(r.results[0].outcome == O.OUTCOME_RESOLVED and d.body["title"] == "tB" and d.body["extra"] == 1, "server wins keeps server's field")
stale.on_conflict = pb.CONFLICT_STRATEGY_CLIENT_WINS
r = push("", stale)
check(r.results[0].outcome == O.OUTCOME_RESOLVED and r.results[0].document.body["title"] == "late", "client wins takes client's field")

# Idempotency: a retried mutation id is a DUPLICATE, never applied twice.
cid = "py-" + uuid.uuid4().hex[:8]
m = pb.Mutation(mutation_id=1, collection=coll, id="counter", patch=body(n=1))
first = push(cid, m)
retry = push(cid, m)
check(first.results[0].outcome == O.OUTCOME_APPLIED, "first attempt applies")
check(retry.results[0].outcome == O.OUTCOME_DUPLICATE and retry.last_mutation_id == 1, "retry is DUPLICATE")
check(retry.results[0].document.version == 1, "retry did not bump the version")

# Atomic batch with a conflict writes nothing.
r = push(cid, pb.Mutation(mutation_id=2, collection=coll, id="new", put=body(a=1)),
         pb.Mutation(mutation_id=3, collection=coll, id="t", base_version=0, put=body(title="mine")), atomic=True)
check([x.outcome for x in r.results] == [O.OUTCOME_NOT_APPLIED, O.OUTCOME_CONFLICT], "atomic batch: NOT_APPLIED + CONFLICT")
got = stub.Get(pb.GetRequest(collection=coll, ids=["new"]))
check(len(got.documents) == 0, "atomic batch wrote nothing")

# Bad input is INVALID_ARGUMENT naming the field.
try:
    push("", pb.Mutation(collection="bad name", id="x", put=body()))
    check(False, "invalid collection refused")
except grpc.RpcError as e:
    check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "mutations[0].collection" in e.details(), "invalid collection refused")

# Pull pages through everything, and Subscribe delivers the backlog.
seen, since = {}, 0
while True:
    page = stub.Pull(pb.PullRequest(since=since, collections=[coll], limit=2))
    for d in page.documents:
        check(d.id not in seen, f"pull sees {d.id} once")
        seen[d.id] = d.version
    since = page.checkpoint
    if not page.has_more:
        break
check(set(seen) == {"t", "counter"}, "pull visits every document")
stream = stub.Subscribe(pb.SubscribeRequest(since=0, collections=[coll]))
ids = []
for msg in stream:
    if msg.WhichOneof("event") == "changes":
        ids += [d.id for d in msg.changes.documents]
    elif msg.progress.caught_up:
        break
stream.cancel()
check(sorted(ids) == ["counter", "t"], "subscribe backlog then caught_up")

# Health and both reflection versions.
health = health_pb2_grpc.HealthStub(channel)
status = health.Check(health_pb2.HealthCheckRequest(service="deltasync.v1.SyncService")).status
check(status == health_pb2.HealthCheckResponse.SERVING, "health SERVING")
for version in ("v1", "v1alpha"):
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    names = [s.name for r in call(iter([reflection_pb2.ServerReflectionRequest(list_services="")])) for s in r.list_services_response.service]
    check("deltasync.v1.SyncService" in names and "grpc.health.v1.Health" in names, f"reflection {version} lists the services")

print("interop: all checks passed")
