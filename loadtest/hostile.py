"""python -m loadtest.hostile: hostile input against a stack (issue #12), with a JSON report.

    python -m loadtest.hostile --local-stack --redis --out loadtest/results/hostile.json
    python -m loadtest.hostile --local-stack --redis --count 200 --only 17,42     # replay two cases
    python -m loadtest.hostile --target 127.0.0.1:50051 --drafters-at H:P --verifiers-at H:P --model-dir DIR

The fuzzer walks the protobuf descriptors of every request message of ControllerService, DrafterService and
VerifierService (VerifyStream included), so a field added to a proto is fuzzed without a change here. Each
field gets boundary and hostile values for its type (0, max uint, negative, NaN, inf, 1e308, 1 MB strings,
newlines, unicode, invalid UTF-8, huge repeated fields, unknown and hostile map keys, known policy knobs with
hostile values), on a valid request of its method; then random combinations of those, byte-level mutations
of valid requests and random protobuf bytes, sent as raw bytes (identity serializers) so that undecodable
input reaches the servers. Cases are numbered and seeded: (seed, index) rebuilds a case exactly.

Every call has a deadline. Recorded: status codes per service and method, INTERNAL/UNKNOWN, calls that ran
into their deadline, streams that failed after streaming, process deaths, every service's health, the
processes' RSS (/proc/<pid>/status VmRSS) before and after, and a greedy generation compared with the
model's own greedy decoding (transformers). Then the issue's targets: simultaneous new sessions (served or
RESOURCE_EXHAUSTED, never UNAVAILABLE), the controller's RSS after rejected maximum-size prompts, and the
stall a large text prompt causes to other streams and to the health check.
"""

import argparse
import asyncio
import json
import logging
import math
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.config import ControllerConfig, max_request_bytes
from eesd.policies import POLICIES
from eesd_proto.eesd.v1 import common_pb2, controller_pb2, controller_pb2_grpc, drafter_pb2, verifier_pb2
from loadtest.environment import commit, machine  # also imported from here by loadtest.faults
from serving.server import MAX_MESSAGE_BYTES

log = logging.getLogger("loadtest.hostile")

MB = 1 << 20
# The client never limits what it sends or receives: the servers' own limits are what is tested.
CLIENT_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
SERVICES: dict[str, Any] = {
    "controller": controller_pb2.DESCRIPTOR.services_by_name["ControllerService"],
    "drafter": drafter_pb2.DESCRIPTOR.services_by_name["DrafterService"],
    "verifier": verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"],
}
BAD_CODES = ("INTERNAL", "UNKNOWN")


# -- hostile values ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Repeat:
    """`count` copies of `value`: a huge repeated field, built only when a case is sent."""

    value: Any
    count: int

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter([self.value] * self.count)


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


UNSET = _Sentinel("<unset>")  # a message field cleared
EMPTY = _Sentinel("<empty>")  # a message field present with no fields set
INVALID_UTF8 = _Sentinel("<invalid-utf8>")  # a string field whose bytes are not UTF-8 (spliced into the bytes)
_UTF8_PLACEHOLDER, _UTF8_BAD = "\x01qZ\x02", b"\xff\xfe\xc3\x28"  # same length: the length prefix stays right

NAN, INF = float("nan"), float("inf")
DOUBLES = [0.0, -0.0, -1.0, NAN, INF, -INF, 1e308, -1e308, 5e-324, 1e-40, 2.0**53 + 1]
FLOATS = [0.0, -1.0, NAN, INF, -INF, 3.4e38, 1e-40]
UINT32 = [0, 1, 2**31 - 1, 2**31, 2**32 - 1]
UINT64 = [0, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
INT32 = [0, -1, -(2**31), 2**31 - 1]
INT64 = [0, -1, -(2**63), 2**63 - 1]
STRINGS = [
    "",
    "\n",
    "id\nERROR forged log line",
    "\r\n\x1b[31mred",
    "\x00",
    "ünïcødé-🙂",
    "\u202e\u200b",
    "../../../etc/passwd",
    "%s%n{0}${x}",
    "A" * 128,
    "A" * 129,
    "A" * MB,
    "é" * (MB // 2),
    INVALID_UTF8,
]
HUGE_REPEATED = MB  # elements of a huge repeated scalar field (about 1 MB on the wire for small ints)
HUGE_MESSAGES = 10_000  # elements of a huge repeated message field, entries of a huge map

_T = FieldDescriptor
SCALARS: dict[int, list] = {
    _T.TYPE_DOUBLE: DOUBLES,
    _T.TYPE_FLOAT: FLOATS,
    _T.TYPE_UINT32: UINT32,
    _T.TYPE_FIXED32: UINT32,
    _T.TYPE_UINT64: UINT64,
    _T.TYPE_FIXED64: UINT64,
    _T.TYPE_INT32: INT32,
    _T.TYPE_SINT32: INT32,
    _T.TYPE_SFIXED32: INT32,
    _T.TYPE_INT64: INT64,
    _T.TYPE_SINT64: INT64,
    _T.TYPE_SFIXED64: INT64,
    _T.TYPE_BOOL: [True, False],
    _T.TYPE_STRING: STRINGS,
    _T.TYPE_BYTES: [b"", b"\x00" * MB, bytes(range(256))],
}


def _policy_keys() -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """(policy option, policy) pairs, (state key, policy) pairs and names a request must not set (dataclass
    fields that are not knobs), from eesd.policies, so new knobs and policies are fuzzed too. Of per-bucket
    state keys (alpha.0, ...) only the first and last bucket, and one beyond the last."""
    knobs, state, forbidden = [], [], set()
    for name, cls in POLICIES.items():
        for f in fields(cls):
            if "bounds" in f.metadata:
                knobs.append((f.name, name))
            else:
                forbidden.add(f.name)
        keys = list(cls().state())
        buckets = sorted({int(k.rpartition(".")[2]) for k in keys if "." in k})
        for key in keys:
            head, dot, bucket = key.rpartition(".")
            if not dot or int(bucket) in (buckets[0], buckets[-1]):
                state.append((key, name))
        if buckets:
            state += [(f"{head}.{buckets[-1] + 1}", name) for head in sorted({k.rpartition(".")[0] for k in keys})]
    return knobs, state, sorted(forbidden - {k for k, _ in knobs})


POLICY_KNOBS, POLICY_STATE_KEYS, NOT_KNOBS = _policy_keys()
KNOWN_VALUES = [NAN, INF, -INF, 1e308, -1e308, -1.0, 0.0, 0.5, 1e6, 5e-324]


def _set_policy_name(message: Message, policy: str) -> None:
    message.name = policy


def _set_draft_policy_name(message: Message, policy: str) -> None:
    message.policy.name = policy


# Maps whose keys mean something: hostile values for every known key, with the policy that knows the key
# set beside it (on the map's own message), plus keys no policy knows.
KNOWN_MAP_KEYS: dict[str, tuple[list[tuple[str, str]], Callable[[Message, str], None]]] = {
    "eesd.v1.PolicyParams.options": (POLICY_KNOBS, _set_policy_name),
    "eesd.v1.DraftRequest.policy_state": (POLICY_STATE_KEYS, _set_draft_policy_name),
}


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == _T.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _repeated(f: FieldDescriptor) -> bool:
    return f.is_repeated


@dataclass(frozen=True)
class FieldCase:
    """One hostile value for one field: `path` from the request message down to the field."""

    path: tuple[FieldDescriptor, ...]
    value: Any
    map_key_policy: str = ""  # a known map key: the policy to name beside it

    @property
    def group(self) -> str:
        name = ".".join(f.name for f in self.path)
        if isinstance(self.value, dict) and self.map_key_policy:
            return f"{name}[{self.map_key_policy}:{next(iter(self.value))}]"
        return name

    @property
    def label(self) -> str:
        return f"{'.'.join(f.name for f in self.path)}={_show(self.value)}"


def _show(value: Any, limit: int = 60) -> str:
    if isinstance(value, Repeat):
        return f"[{value.count} x {_show(value.value, 20)}]"
    if isinstance(value, list | tuple):
        if len(value) > 8:
            return f"[{len(value)} x {_show(value[0], 20)}]" if value else "[]"
        return "[" + ", ".join(_show(v, 20) for v in value) + "]"
    if isinstance(value, dict):
        if len(value) > 4:
            return f"{{{len(value)} entries}}"
        return "{" + ", ".join(f"{_show(k, 24)}: {_show(v, 20)}" for k, v in value.items()) + "}"
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:8]!r}*{len(value)}"
    return repr(value)


def field_values(f: FieldDescriptor) -> list:
    """Hostile values of a field's own type (lists for repeated fields, dicts for maps)."""
    if _is_map(f):
        key_field = f.message_type.fields_by_name["key"]
        value_field = f.message_type.fields_by_name["value"]
        value = _plain(value_field)
        if key_field.type == _T.TYPE_STRING:
            keys = ["no-such-knob", "", "\n", "A" * MB, "ünï", *NOT_KNOBS]
        else:
            keys = [v for v in SCALARS[key_field.type] if not isinstance(v, _Sentinel)]
        values = [{}] + [{k: value} for k in keys]
        values.append({(f"k{i}" if key_field.type == _T.TYPE_STRING else i): value for i in range(HUGE_MESSAGES)})
        return values
    if f.type == _T.TYPE_MESSAGE:
        return [[], Repeat(EMPTY, HUGE_MESSAGES)] if _repeated(f) else [UNSET, EMPTY]
    if f.type == _T.TYPE_ENUM:
        scalars = [0, max(v.number for v in f.enum_type.values), 99, -1]
    else:
        scalars = SCALARS[f.type]
    if not _repeated(f):
        return list(scalars)
    plain = [v for v in scalars if not isinstance(v, _Sentinel) and not (isinstance(v, str | bytes) and len(v) > 1024)]
    huge = Repeat(_plain(f), HUGE_REPEATED if f.type not in (_T.TYPE_STRING, _T.TYPE_BYTES) else 1024)
    return [[], plain, huge, *([v] for v in plain)]


def _plain(f: FieldDescriptor) -> Any:
    """An ordinary value of a scalar field's type."""
    return {
        _T.TYPE_DOUBLE: 0.5,
        _T.TYPE_FLOAT: 0.5,
        _T.TYPE_BOOL: True,
        _T.TYPE_STRING: "x",
        _T.TYPE_BYTES: b"x",
        _T.TYPE_ENUM: 0,
    }.get(f.type, 1)


def walk(descriptor: Descriptor, prefix: tuple[FieldDescriptor, ...] = (), depth: int = 5) -> Iterator[FieldCase]:
    """Every hostile FieldCase of a message type, nested messages included (down to `depth` levels)."""
    for f in descriptor.fields:
        path = (*prefix, f)
        for value in field_values(f):
            yield FieldCase(path, value)
        if _is_map(f):
            known, _ = KNOWN_MAP_KEYS.get(f.full_name, ([], None))
            for key, policy in known:
                for value in KNOWN_VALUES:
                    yield FieldCase(path, {key: value}, policy)
        elif f.type == _T.TYPE_MESSAGE and depth > 1 and f.message_type is not descriptor:
            yield from walk(f.message_type, path, depth - 1)


def apply(message: Message, case: FieldCase) -> None:
    """Sets the case's value on `message` (in place): the first element of a repeated message on the way."""
    target = message
    for f in case.path[:-1]:
        if _repeated(f):
            container = getattr(target, f.name)
            target = container[0] if len(container) else container.add()
        else:
            target = getattr(target, f.name)
    f, value = case.path[-1], case.value
    if value is UNSET:
        target.ClearField(f.name)
    elif value is EMPTY:
        target.ClearField(f.name)
        getattr(target, f.name).SetInParent()
    elif _is_map(f):
        container = getattr(target, f.name)
        container.clear()
        container.update(value)
        if case.map_key_policy:
            KNOWN_MAP_KEYS[f.full_name][1](target, case.map_key_policy)
    elif _repeated(f):
        target.ClearField(f.name)
        container = getattr(target, f.name)
        if f.type == _T.TYPE_MESSAGE:
            for _ in value:
                container.add()
        else:
            container.extend(_UTF8_PLACEHOLDER if v is INVALID_UTF8 else v for v in value)
    else:
        setattr(target, f.name, _UTF8_PLACEHOLDER if value is INVALID_UTF8 else value)


def serialize(message: Message) -> bytes:
    """The message's bytes, with any invalid-UTF-8 placeholder spliced in as such."""
    data = message.SerializeToString()
    placeholder = _UTF8_PLACEHOLDER.encode()
    return data.replace(placeholder, _UTF8_BAD) if placeholder in data else data


# -- mutations and random bytes ------------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random, others: Sequence[bytes] = ()) -> bytes:
    """A valid request's bytes with 1-4 random byte-level edits."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("flip", "set", "insert", "delete", "truncate", "duplicate", "splice", "varint"))
        i = rng.randrange(len(buf) + 1)
        if op == "flip" and buf:
            j = rng.randrange(len(buf))
            buf[j] ^= 1 << rng.randrange(8)
        elif op == "set" and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == "insert":
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete" and buf:
            del buf[i : i + rng.randint(1, 8)]
        elif op == "truncate":
            del buf[i:]
        elif op == "duplicate" and buf:
            j = rng.randrange(len(buf))
            buf[i:i] = buf[j : j + rng.randint(1, 32)]
        elif op == "splice" and others:
            other = rng.choice(others)
            buf[i:i] = other[: rng.randint(0, len(other))]
        elif op == "varint":  # a field with a random number, wire type and a huge varint payload
            tag = (rng.randint(1, 40) << 3) | rng.choice((0, 1, 2, 5))
            buf[i:i] = _varint(tag) + _varint(rng.choice((0, 2**32 - 1, 2**63, 2**64 - 1, rng.getrandbits(35))))
    return bytes(buf)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def random_protobuf(rng: random.Random) -> bytes:
    """Random bytes: plain noise, or a sequence of random tags and payloads (which often parses)."""
    if rng.random() < 0.4:
        return rng.randbytes(rng.randint(0, 512))
    out = bytearray()
    for _ in range(rng.randint(1, 12)):
        number, wire = rng.choice((rng.randint(1, 15), rng.randint(16, 2**29 - 1))), rng.choice((0, 1, 2, 5, 3, 4))
        out += _varint((number << 3) | wire)
        if wire == 0:
            out += _varint(rng.choice((0, 1, 2**31, 2**32 - 1, 2**64 - 1, rng.getrandbits(20))))
        elif wire == 1:
            out += rng.randbytes(8)
        elif wire == 5:
            out += rng.randbytes(4)
        elif wire == 2:
            payload = rng.randbytes(rng.randint(0, 64))
            length = rng.choice((len(payload), len(payload), 2**31, rng.randint(0, 100)))
            out += _varint(length) + payload
    return bytes(out)


# -- the stack under test --------------------------------------------------------------------------------


@dataclass
class Stack:
    """Where the services are, and (for a local stack) their processes."""

    controller: str
    drafters: list[str]
    verifiers: list[str]
    model_dir: str | None = None
    processes: dict[str, subprocess.Popen | int] = field(default_factory=dict)  # name -> process or pid

    @classmethod
    def from_local(cls, stack) -> "Stack":
        """From a serving.local_stack.LocalStack (names: controller, drafter0, verifier0, redis, ...)."""
        processes, counts = {}, Counter()
        for node in stack.nodes:
            name = node.role if node.role in ("controller", "redis") else f"{node.role}{counts[node.role]}"
            counts[node.role] += 1
            processes[name] = node.process
        model_dir = next((a for n in stack.nodes for a in _after(n.args, "--model-dir")), None)
        return cls(
            stack.controller_address,
            [n.address for n in stack.by_role("drafter")],
            [n.address for n in stack.by_role("verifier")],
            model_dir,
            processes,
        )

    def address(self, service: str) -> str:
        return {"controller": self.controller, "drafter": self.drafters[0], "verifier": self.verifiers[0]}[service]

    def services(self) -> dict[str, str]:
        named = {"controller": self.controller}
        named.update({f"drafter{i}": a for i, a in enumerate(self.drafters)})
        named.update({f"verifier{i}": a for i, a in enumerate(self.verifiers)})
        return named

    def request_limit(self) -> int:
        """The largest request the controller accepts: sized from its prompt limit (the served model's context,
        when this stack knows the model), else gRPC's message limit."""
        if self.model_dir is None:
            return MAX_MESSAGE_BYTES
        context = json.loads((Path(self.model_dir) / "config.json").read_text())["max_position_embeddings"]
        return max_request_bytes(ControllerConfig().prompt_limit(context))

    def pid(self, name: str) -> int | None:
        p = self.processes.get(name)
        return p.pid if isinstance(p, subprocess.Popen) else p

    def dead(self) -> dict[str, int | None]:
        """Processes that exited (name -> exit status; None when only a pid is known and it is gone)."""
        out = {}
        for name, p in self.processes.items():
            if isinstance(p, subprocess.Popen):
                if p.poll() is not None:
                    out[name] = p.returncode
            elif not Path(f"/proc/{p}").exists():
                out[name] = None
        return out


def _after(args: Sequence[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


def rss_mb(pid: int | None) -> float | None:
    """Resident set size of a process (VmRSS), MB; None when unknown."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_all(stack: Stack) -> dict[str, float | None]:
    return {name: rss_mb(stack.pid(name)) for name in stack.processes}


def health(address: str, timeout_s: float = 5.0) -> dict:
    """The standard health check of one service: status name and latency."""
    start = time.perf_counter()
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as error:
        status = f"error: {error.code().name}"
    return {"status": status, "latency_ms": round((time.perf_counter() - start) * 1e3, 2)}


def health_all(stack: Stack) -> dict[str, dict]:
    return {name: health(address) for name, address in stack.services().items()}


@dataclass(frozen=True)
class ModelFacts:
    vocab_size: int
    context: int
    has_tokenizer: bool


def model_facts(model_dir: str | None) -> ModelFacts:
    if not model_dir or not (Path(model_dir) / "config.json").is_file():
        return ModelFacts(256, 512, False)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return ModelFacts(
        config["vocab_size"], config.get("max_position_embeddings", 512), (Path(model_dir) / "tokenizer.json").is_file()
    )


# -- cases -------------------------------------------------------------------------------------------------


def _message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


@dataclass(frozen=True)
class Method:
    service: str  # controller, drafter or verifier
    descriptor: MethodDescriptor

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def path(self) -> str:
        return f"/{self.descriptor.containing_service.full_name}/{self.descriptor.name}"

    @property
    def key(self) -> str:
        return f"{self.service}.{self.name}"

    @property
    def streams_in(self) -> bool:
        return self.descriptor.client_streaming

    @property
    def streams_out(self) -> bool:
        return self.descriptor.server_streaming


def methods() -> list[Method]:
    return [Method(service, m) for service, desc in SERVICES.items() for m in desc.methods]


@dataclass
class Case:
    index: int
    method: Method
    kind: str  # field, combo, mutation, random-bytes
    label: str
    build: Callable[[], bytes | list[bytes]]  # the request bytes (a list for a client stream)


class Fuzzer:
    """Builds the numbered cases of one seed against one stack: valid requests per method, and the hostile
    versions of them."""

    def __init__(
        self,
        seed: int,
        facts: ModelFacts,
        stack: Stack,
        identity: common_pb2.ModelIdentity,
        controller_session: str = "",
    ):
        self.seed, self.facts, self.stack, self.identity = seed, facts, stack, identity
        # Sessions the fuzzer opens on nodes (a few, reused: the fuzz is about values, not about capacity;
        # close_sessions frees them), and one finished controller session for Cancel/GetSession (unique
        # per run: a stack refuses a session id in use).
        self.node_sessions = [f"hostile-{seed}-{i}" for i in range(8)]
        self.controller_session = controller_session or f"hostile-{seed}-{uuid.uuid4().hex[:12]}"

    def _ids(self, rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(3, self.facts.vocab_size) for _ in range(n)]

    def baseline(self, method: Method, rng: random.Random) -> Message | list[Message]:
        """A valid request of the method (a list of messages for a client stream)."""
        cls = _message_class(method.descriptor.input_type)
        session = rng.choice(self.node_sessions)
        if method.key == "controller.Generate":
            return cls(prompt_ids=controller_pb2.TokenIds(ids=self._ids(rng, rng.randint(2, 6))), max_new_tokens=4)
        if method.name in ("Cancel", "GetSession") and method.service == "controller":
            return cls(session_id=self.controller_session)
        if method.name == "OpenSession":
            return cls(session_id=session, reserve_tokens=32, expected_identity=self.identity)
        if method.name == "Prefill":
            return cls(session_id=session, round=0, base_length=0, token_ids=self._ids(rng, 4))
        if method.name == "Draft":
            return cls(
                session_id=session,
                base_length=0,
                pending_token_ids=self._ids(rng, 3),
                max_tokens=3,
                seed=1,
                policy=common_pb2.PolicyParams(name="fixed", k_max=3),
                verifier_address=self.stack.verifiers[0],
                verifier_id=self.stack.verifiers[0],
            )
        if method.name == "Verify":
            return self._verify_request(session, rng)
        if method.name == "VerifyStream":
            return [
                cls(hello=verifier_pb2.VerifyHello(identity=self.identity, node_id="hostile", mode=1)),
                cls(verify_request=self._verify_request(session, rng)),
            ]
        request = cls()  # a method this module does not know yet: its fields still get fuzzed
        if "session_id" in cls.DESCRIPTOR.fields_by_name:
            request.session_id = session
        return request

    def _verify_request(self, session: str, rng: random.Random) -> verifier_pb2.VerifyRequest:
        return verifier_pb2.VerifyRequest(
            session_id=session,
            base_length=0,
            pending_token_ids=self._ids(rng, 3),
            draft=verifier_pb2.DraftBlock(token_ids=self._ids(rng, 2)),
            seed=1,
        )

    def field_cases(self, method: Method) -> list[FieldCase]:
        descriptor = method.descriptor.input_type
        return list(walk(descriptor))

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{index}")

    def _with_fields(self, method: Method, index: int, chosen: Sequence[FieldCase]) -> bytes | list[bytes]:
        base = self.baseline(method, self._rng(index))
        for case in chosen:
            for message in _targets(base, case):
                apply(message, case)
        return [serialize(m) for m in base] if isinstance(base, list) else serialize(base)

    def _mutated(self, method: Method, index: int) -> bytes | list[bytes]:
        rng = self._rng(index)
        base = self.baseline(method, rng)
        others = [serialize(self.baseline(m, rng)) for m in methods() if not m.streams_in][:6]
        if isinstance(base, list):
            data = [serialize(m) for m in base]
            data[-1] = mutate(data[-1], rng, others)
            return data
        return mutate(serialize(base), rng, others)

    def _random(self, method: Method, index: int) -> bytes | list[bytes]:
        rng = self._rng(index)
        if method.streams_in:
            hello = serialize(self.baseline(method, rng)[0])
            return [random_protobuf(rng)] if rng.random() < 0.3 else [hello, random_protobuf(rng)]
        return random_protobuf(rng)

    def cases(self, count: int) -> list[Case]:
        """`count` cases: about 60% single hostile fields (round-robin over every field of every method so
        that a small count still touches each), 15% combinations of 2-4 of them, 12.5% mutations of valid
        requests and 12.5% random bytes; in a seeded order."""
        rng = random.Random(self.seed)
        all_methods = methods()
        groups: dict[tuple[str, str], list[FieldCase]] = defaultdict(list)
        by_method: dict[str, list[FieldCase]] = {}
        for method in all_methods:
            by_method[method.key] = self.field_cases(method)
            for case in by_method[method.key]:
                groups[(method.key, case.group)].append(case)
        order = sorted(groups)
        rng.shuffle(order)
        for key in order:
            rng.shuffle(groups[key])
        singles: list[tuple[Method, FieldCase]] = []
        lookup = {m.key: m for m in all_methods}
        round_index = 0
        n_random = n_mutation = count // 8
        n_combo = (count * 15) // 100
        n_single = count - n_random - n_mutation - n_combo
        while len(singles) < n_single and any(len(groups[k]) > round_index for k in order):
            for key in order:
                if len(groups[key]) > round_index and len(singles) < n_single:
                    singles.append((lookup[key[0]], groups[key][round_index]))
            round_index += 1
        plan: list[tuple[str, Method, Any]] = [("field", m, [c]) for m, c in singles]
        with_fields = [m for m in all_methods if by_method[m.key]]
        for _ in range(count - len(plan) - n_random - n_mutation):
            method = rng.choice(with_fields)
            plan.append(("combo", method, rng.sample(by_method[method.key], rng.randint(2, 4))))
        plan += [("mutation", rng.choice(all_methods), None) for _ in range(n_mutation)]
        plan += [("random-bytes", rng.choice(all_methods), None) for _ in range(n_random)]
        rng.shuffle(plan)
        out = []
        for index, (kind, method, chosen) in enumerate(plan):
            if kind in ("field", "combo"):
                label = " & ".join(c.label for c in chosen)
                build = _bind(self._with_fields, method, index, chosen)
            elif kind == "mutation":
                label, build = "mutated valid request", _bind(self._mutated, method, index)
            else:
                label, build = "random bytes", _bind(self._random, method, index)
            out.append(Case(index, method, kind, label, build))
        return out


def _bind(fn, *args):
    return lambda: fn(*args)


def _targets(base: Message | list[Message], case: FieldCase) -> list[Message]:
    """The messages of a request a field case applies to: for a client stream, the messages whose oneof
    member is the case's first field (the last message when none is)."""
    if not isinstance(base, list):
        return [base]
    first = case.path[0]
    hit = [m for m in base if first.containing_oneof and m.WhichOneof(first.containing_oneof.name) == first.name]
    return hit or [base[-1]]


# -- calls -------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: str  # a grpc.StatusCode name; OK when the call (and its stream) completed
    details: str = ""
    latency_s: float = 0.0
    messages: int = 0  # response messages received
    round_errors: list[str] = field(default_factory=list)  # VerifyStream RoundError codes

    @property
    def mid_stream(self) -> bool:
        """Failed after a Generate stream had sent chunks (a request that should have been refused)."""
        return self.code != "OK" and self.messages > 0


class Caller:
    """Raw calls: request bytes in, response bytes out, on one channel per address."""

    def __init__(self):
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(address, options=CLIENT_OPTIONS)
        return self._channels[address]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def call(self, address: str, method: Method, payload: bytes | list[bytes], deadline_s: float) -> Outcome:
        channel = self.channel(address)
        start, received, round_errors = time.perf_counter(), 0, []
        try:
            if method.streams_in:
                answers = channel.stream_stream(method.path)(iter(payload), timeout=deadline_s)
            elif method.streams_out:
                answers = channel.unary_stream(method.path)(payload, timeout=deadline_s)
            else:
                channel.unary_unary(method.path)(payload, timeout=deadline_s)
                answers = ()
            out_cls = _message_class(method.descriptor.output_type)
            for data in answers:
                received += 1
                if "round_error" in out_cls.DESCRIPTOR.fields_by_name:
                    answer = out_cls.FromString(data)
                    if answer.HasField("round_error"):
                        round_errors.append(grpc_code_name(answer.round_error.code))
            code, details = "OK", ""
        except grpc.RpcError as error:
            code, details = error.code().name, (error.details() or "")[:300]
        return Outcome(code, details, time.perf_counter() - start, received, round_errors)


def grpc_code_name(number: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == number), f"CODE_{number}")


# -- the fuzz run ------------------------------------------------------------------------------------------


def model_identity(stack: Stack) -> common_pb2.ModelIdentity:
    with grpc.insecure_channel(stack.drafters[0] if stack.drafters else stack.verifiers[0]) as channel:
        service = "DrafterService" if stack.drafters else "VerifierService"
        response = getattr(drafter_pb2 if stack.drafters else verifier_pb2, f"{service}GetModelIdentityResponse")
        call = channel.unary_unary(f"/eesd.v1.{service}/GetModelIdentity", response_deserializer=response.FromString)
        return call(b"", timeout=30).identity


def generate_tokens(
    address: str, prompt: list[int], max_new_tokens: int, deadline_s: float = 120.0, **fields
) -> list[int]:
    """A greedy generation through the raw stub (no SDK retries): the committed token ids."""
    request = controller_pb2.GenerateRequest(
        prompt_ids=controller_pb2.TokenIds(ids=prompt), max_new_tokens=max_new_tokens, ignore_eos=True, **fields
    )
    with grpc.insecure_channel(address) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        tokens = []
        for message in stub.Generate(request, timeout=deadline_s):
            if message.WhichOneof("event") == "chunk":
                tokens.extend(message.chunk.token_ids)
        return tokens


def wait_ready(stack: Stack, timeout_s: float = 60.0) -> float:
    """Waits until the controller generates (a controller may answer UNAVAILABLE until it has probed its
    nodes, as the protocol allows before the first response); returns the seconds it took."""
    start = time.perf_counter()
    while True:
        try:
            generate_tokens(stack.controller, [3, 4, 5], 1, deadline_s=30.0)
            return round(time.perf_counter() - start, 2)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.perf_counter() - start > timeout_s:
                raise
            time.sleep(0.2)


_ORACLE_CACHE: dict[tuple, list[int]] = {}


def greedy_reference(model_dir: str, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """The model's own greedy decoding (transformers generate, do_sample=False, float32, no EOS stop)."""
    key = (str(model_dir), tuple(prompt), max_new_tokens)
    if key not in _ORACLE_CACHE:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            out = model.generate(
                torch.tensor([list(prompt)]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=None,
                pad_token_id=0,
            )
        _ORACLE_CACHE[key] = out[0, len(prompt) :].tolist()
    return _ORACLE_CACHE[key]


Oracle = Callable[[str, Sequence[int], int], Sequence[int]]
GREEDY_PROMPT = [11, 12, 13, 14]


def greedy_check(stack: Stack, oracle: Oracle = greedy_reference, max_new_tokens: int = 12) -> dict:
    """A normal greedy generation through the stack equals the model's own greedy output."""
    prompt = GREEDY_PROMPT
    expected = list(oracle(stack.model_dir, prompt, max_new_tokens)) if stack.model_dir else None
    try:
        got, error = generate_tokens(stack.controller, prompt, max_new_tokens), ""
    except grpc.RpcError as e:
        got, error = None, f"{e.code().name}: {e.details()}"
    return {"prompt": prompt, "expected": expected, "got": got, "error": error, "equal": got == expected}


def close_sessions(stack: Stack, session_ids: Sequence[str]) -> None:
    """Frees the sessions the fuzzer opened on the nodes (errors ignored: the nodes may refuse)."""
    for role, addresses in (("drafter", stack.drafters), ("verifier", stack.verifiers)):
        module, prefix = (drafter_pb2, "DrafterService") if role == "drafter" else (verifier_pb2, "VerifierService")
        request_cls = getattr(module, f"{prefix}CloseSessionRequest")
        for address in addresses:
            with grpc.insecure_channel(address) as channel:
                close = channel.unary_unary(f"/eesd.v1.{prefix}/CloseSession")
                for session_id in session_ids:
                    try:
                        close(request_cls(session_id=session_id).SerializeToString(), timeout=10)
                    except grpc.RpcError:
                        pass


@dataclass
class FuzzResult:
    cases: int
    codes: dict  # service -> method -> code -> count
    by_kind: dict  # kind -> code -> count
    round_errors: dict  # code -> count (RoundError messages on VerifyStreams)
    bad: list  # INTERNAL/UNKNOWN calls (and INTERNAL/UNKNOWN round errors)
    over_deadline: list
    mid_stream: list
    slowest: list
    deaths: dict  # name -> {"status", "after_case"}
    unhealthy: list  # health checks during the run that were not SERVING
    fields_covered: int
    fields_total: int
    seconds: float

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def run_fuzz(
    stack: Stack,
    count: int = 1000,
    seed: int = 0,
    deadline_s: float = 15.0,
    only: Sequence[int] | None = None,
    health_every: int = 50,
    progress: Callable[[Case, Outcome], None] | None = None,
) -> FuzzResult:
    """Sends `count` hostile requests (sequentially, each with `deadline_s`) and classifies the answers."""
    facts = model_facts(stack.model_dir)
    fuzzer = Fuzzer(seed, facts, stack, model_identity(stack))
    generate_tokens(stack.controller, [5, 6, 7], 2, session_id=fuzzer.controller_session)
    cases = fuzzer.cases(count)
    if only is not None:
        cases = [c for c in cases if c.index in set(only)]
    codes: dict = defaultdict(lambda: defaultdict(Counter))
    by_kind: dict = defaultdict(Counter)
    round_errors: Counter = Counter()
    bad, over, mid, timings, unhealthy = [], [], [], [], []
    deaths: dict = {}
    covered: set[tuple[str, str]] = set()
    caller = Caller()
    start = time.perf_counter()
    try:
        for n, case in enumerate(cases, 1):
            outcome = caller.call(stack.address(case.method.service), case.method, case.build(), deadline_s)
            codes[case.method.service][case.method.name][outcome.code] += 1
            by_kind[case.kind][outcome.code] += 1
            round_errors.update(outcome.round_errors)
            record = {
                "index": case.index,
                "method": case.method.key,
                "kind": case.kind,
                "case": case.label[:300],
                "code": outcome.code,
                "details": outcome.details,
                "latency_s": round(outcome.latency_s, 3),
            }
            if case.kind == "field":
                covered.add((case.method.key, case.label.split("=", 1)[0]))
            if outcome.code in BAD_CODES or any(c in BAD_CODES for c in outcome.round_errors):
                bad.append({**record, "round_errors": outcome.round_errors})
            if outcome.code == "DEADLINE_EXCEEDED":
                over.append(record)
            if outcome.mid_stream and case.method.streams_out and not case.method.streams_in:
                mid.append({**record, "messages": outcome.messages})
            timings.append(record)
            if progress is not None:
                progress(case, outcome)
            for name, status in stack.dead().items():
                deaths.setdefault(name, {"status": status, "after_case": case.index})
            if health_every and n % health_every == 0:
                for name, h in health_all(stack).items():
                    if h["status"] != "SERVING":
                        unhealthy.append({"after_case": case.index, "service": name, **h})
    finally:
        caller.close()
        close_sessions(stack, fuzzer.node_sessions)
    fields_total = {(m.key, ".".join(f.name for f in c.path)) for m in methods() for c in fuzzer.field_cases(m)}
    return FuzzResult(
        cases=len(cases),
        codes={s: {m: dict(c) for m, c in ms.items()} for s, ms in codes.items()},
        by_kind={k: dict(c) for k, c in by_kind.items()},
        round_errors=dict(round_errors),
        bad=bad,
        over_deadline=over,
        mid_stream=mid,
        slowest=sorted(timings, key=lambda r: -r["latency_s"])[:10],
        deaths=deaths,
        unhealthy=unhealthy,
        fields_covered=len(covered & fields_total),
        fields_total=len(fields_total),
        seconds=round(time.perf_counter() - start, 2),
    )


def settle_rss(stack: Stack, wait_s: float) -> dict[str, float | None]:
    time.sleep(wait_s)
    return rss_all(stack)


def rss_within(before: dict, after: dict, ratio: float, slack_mb: float) -> dict[str, bool]:
    """Per process: after <= before * (1 + ratio) + slack_mb."""
    return {
        name: after.get(name) is not None and after[name] <= value * (1 + ratio) + slack_mb
        for name, value in before.items()
        if value is not None
    }


# -- the targets -----------------------------------------------------------------------------------


def simultaneous_sessions(
    stack: Stack,
    n: int = 300,
    max_new_tokens: int = 4,
    deadline_s: float = 300.0,
    oracle: Oracle | None = greedy_reference,
    seed: int = 0,
) -> dict:
    """`n` new greedy sessions started at once (asyncio, raw stub): each must be served (and its tokens equal
    the model's greedy output for its prompt) or refused RESOURCE_EXHAUSTED, none UNAVAILABLE."""
    facts = model_facts(stack.model_dir)
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, facts.vocab_size) for _ in range(4)] for _ in range(4)]

    async def run() -> list[tuple[str, list[int], float]]:
        async with grpc.aio.insecure_channel(stack.controller, options=CLIENT_OPTIONS) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)

            async def one(i: int) -> tuple[str, list[int], float]:
                request = controller_pb2.GenerateRequest(
                    prompt_ids=controller_pb2.TokenIds(ids=prompts[i % len(prompts)]),
                    max_new_tokens=max_new_tokens,
                    ignore_eos=True,
                )
                start, tokens = time.perf_counter(), []
                try:
                    async for message in stub.Generate(request, timeout=deadline_s):
                        if message.WhichOneof("event") == "chunk":
                            tokens.extend(message.chunk.token_ids)
                    return "OK", tokens, time.perf_counter() - start
                except grpc.aio.AioRpcError as error:
                    return error.code().name, tokens, time.perf_counter() - start

            return await asyncio.gather(*(one(i) for i in range(n)))

    start = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - start
    codes = Counter(code for code, _, _ in results)
    corrupted = None
    if oracle is not None and stack.model_dir:
        expected = [list(oracle(stack.model_dir, p, max_new_tokens)) for p in prompts]
        corrupted = sum(1 for i, (code, tokens, _) in enumerate(results) if code == "OK" and tokens != expected[i % 4])
    latencies = sorted(s for code, _, s in results if code == "OK")
    return {
        "sessions": n,
        "max_new_tokens": max_new_tokens,
        "codes": dict(codes),
        "corrupted": corrupted,
        "wall_s": round(wall, 2),
        "served_latency_s": {
            "p50": round(latencies[len(latencies) // 2], 3) if latencies else None,
            "max": round(latencies[-1], 3) if latencies else None,
        },
        "pass": codes["OK"] + codes["RESOURCE_EXHAUSTED"] == n and not corrupted,
    }


def max_prompt_payload(size: int = MAX_MESSAGE_BYTES, token: int = 1) -> tuple[bytes, int]:
    """A GenerateRequest of exactly `size` bytes (default: the largest the services accept): a token-id
    prompt of ids `token` (one byte each), far beyond any context, and max_new_tokens 1 written as a padded
    (non-minimal, still valid) varint so that the size comes out exact. Returns (bytes, prompt ids)."""
    for n in range(size - 8, 0, -1):  # a few steps: the framing is under 16 bytes
        inner = b"\x0a" + _varint(n) + bytes([token]) * n  # TokenIds.ids, packed
        head = b"\x12" + _varint(len(inner)) + inner  # GenerateRequest.prompt_ids
        room = size - len(head) - 1  # after the tag of max_new_tokens
        if 1 <= room <= 5:
            one = b"\x01" if room == 1 else b"\x81" + b"\x80" * (room - 2) + b"\x00"
            return head + b"\x18" + one, n
    raise ValueError(f"no prompt fits in {size} bytes")


class RssSampler:
    """Samples a process's RSS every `period_s` on a thread; `peak` is the largest sample."""

    def __init__(self, pid: int | None, period_s: float = 0.05):
        self.pid, self.period_s, self.peak = pid, period_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid) or 0.0)
            self._stop.wait(self.period_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def max_size_prompts(
    stack: Stack,
    count: int = 100,
    deadline_s: float = 120.0,
    settle_s: float = 5.0,
    limit: int | None = None,
    rss_cap_mb: float | None = None,
) -> dict:
    """`count` maximum-size token-id prompts (the controller's message limit, ids far beyond the context),
    sent one after another: each must be refused (INVALID_ARGUMENT) and the controller's RSS must come back
    within 10% of its baseline. Then one byte more than the limit, which gRPC itself must refuse
    (RESOURCE_EXHAUSTED). The run stops early when the controller's RSS passes `rss_cap_mb` (default: its
    baseline plus a quarter of the available memory, at most 2 GB), so a controller that keeps what it
    refused cannot exhaust a shared machine. `limit`: the controller's (default `stack.request_limit()`)."""
    limit = stack.request_limit() if limit is None else limit
    payload, ids = max_prompt_payload(limit)
    method = next(m for m in methods() if m.key == "controller.Generate")
    pid = stack.pid("controller")
    baseline = rss_mb(pid)
    if rss_cap_mb is None and baseline is not None:
        rss_cap_mb = baseline + min(2048.0, available_mb() / 4)
    caller = Caller()
    codes, latencies, details, sent, stopped = Counter(), [], "", 0, ""
    try:
        with RssSampler(pid) as sampler:
            for _ in range(count):
                outcome = caller.call(stack.controller, method, payload, deadline_s)
                sent += 1
                codes[outcome.code] += 1
                latencies.append(outcome.latency_s)
                details = details or outcome.details
                if rss_cap_mb is not None and (rss_mb(pid) or 0.0) > rss_cap_mb:
                    stopped = f"stopped after {sent} prompts: controller RSS above the cap of {rss_cap_mb:.0f} MB"
                    break
        after_now = rss_mb(pid)
        after = settle_rss(stack, settle_s).get("controller") if pid else None
        over = caller.call(stack.controller, method, max_prompt_payload(limit + 1)[0], deadline_s)
    finally:
        caller.close()
    within = baseline is not None and after is not None and after <= baseline * 1.10
    return {
        "prompts": count,
        "sent": sent,
        "stopped": stopped,
        "message_bytes": len(payload),
        "prompt_ids": ids,
        "codes": dict(codes),
        "details": details[:200],
        "one_byte_over_the_limit": over.code,
        "latency_s": {"mean": round(sum(latencies) / len(latencies), 3), "max": round(max(latencies), 3)},
        "controller_rss_mb": {
            "baseline": baseline,
            "peak": round(sampler.peak, 1),
            "after": after_now,
            f"after_{settle_s:g}s": after,
            "cap": rss_cap_mb,
        },
        "pass": within and not stopped and set(codes) == {"INVALID_ARGUMENT"},
    }


def available_mb() -> float:
    """MemAvailable of the machine, MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def big_text(size: int) -> str:
    """`size` bytes of ordinary text (Python source, what the reference model was trained on), repeated."""
    seed_text = Path(json.__file__).read_text() + Path(argparse.__file__).read_text()
    return (seed_text * (size // len(seed_text) + 1))[:size]


def event_loop_stall(
    stack: Stack,
    sizes_mb: Sequence[float] = (1, 4),
    baseline_s: float = 2.0,
    deadline_s: float = 300.0,
    health_period_s: float = 0.02,
) -> dict:
    """The stall a large text prompt causes on the controller: while it is processed (and until `baseline_s`
    after it was sent), the largest gap between consecutive messages of concurrent greedy streams (one token
    per chunk; a stream's first gap is its time to first token) and the health check's latency, each against
    the same measures over `baseline_s` without it."""
    facts = model_facts(stack.model_dir)
    prompt = GREEDY_PROMPT
    stream_tokens = max(8, min(256, facts.context - len(prompt) - 1))

    async def measure(text: str | None) -> dict:
        gaps, health_ms, stop = [], [], asyncio.Event()

        async def stream() -> None:
            async with grpc.aio.insecure_channel(stack.controller, options=CLIENT_OPTIONS) as channel:
                stub = controller_pb2_grpc.ControllerServiceStub(channel)
                request = controller_pb2.GenerateRequest(
                    prompt_ids=controller_pb2.TokenIds(ids=prompt),
                    max_new_tokens=stream_tokens,
                    ignore_eos=True,
                    policy=common_pb2.PolicyParams(name="off"),
                )
                while not stop.is_set():
                    last = time.perf_counter()
                    try:
                        async for _ in stub.Generate(request, timeout=deadline_s):
                            now = time.perf_counter()
                            gaps.append(now - last)
                            last = now
                            if stop.is_set():
                                break
                    except grpc.aio.AioRpcError:
                        pass

        async def check_health() -> None:
            async with grpc.aio.insecure_channel(stack.controller) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while not stop.is_set():
                    start = time.perf_counter()
                    try:
                        await stub.Check(health_pb2.HealthCheckRequest(), timeout=deadline_s)
                    except grpc.aio.AioRpcError:
                        pass
                    health_ms.append((time.perf_counter() - start) * 1e3)
                    await asyncio.sleep(health_period_s)

        tasks = [asyncio.create_task(stream()), asyncio.create_task(check_health())]
        await asyncio.sleep(0.5)  # both running
        gaps.clear()
        health_ms.clear()
        answer: dict = {}
        if text is None:
            await asyncio.sleep(baseline_s)
        else:
            async with grpc.aio.insecure_channel(stack.controller, options=CLIENT_OPTIONS) as channel:
                stub = controller_pb2_grpc.ControllerServiceStub(channel)
                start = time.perf_counter()
                try:
                    async for _ in stub.Generate(
                        controller_pb2.GenerateRequest(prompt_text=text, max_new_tokens=1), timeout=deadline_s
                    ):
                        pass
                    answer = {"code": "OK"}
                except grpc.aio.AioRpcError as error:
                    answer = {"code": error.code().name, "details": (error.details() or "")[:160]}
                answer["latency_s"] = round(time.perf_counter() - start, 3)
            # A window as long as the baseline's (at least 0.2 s after the answer), so the maxima compare.
            await asyncio.sleep(max(0.2, baseline_s - (time.perf_counter() - start)))
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {
            **({"answer": answer} if answer else {}),
            "max_chunk_gap_ms": round(max(gaps) * 1e3, 1) if gaps else None,
            "chunks": len(gaps),
            "max_health_ms": round(max(health_ms), 1) if health_ms else None,
            "health_checks": len(health_ms),
        }

    out = {"controller_has_tokenizer": facts.has_tokenizer, "baseline": asyncio.run(measure(None))}
    for size in sizes_mb:
        out[f"{size:g}MB"] = asyncio.run(measure(big_text(int(size * MB))))
    return out


# -- the report --------------------------------------------------------------------------------------------


def fuzz_targets(result: FuzzResult, health_after: dict, greedy: dict, rss_ok: dict[str, bool]) -> list[dict]:
    unhealthy = {n for n, h in health_after.items() if h["status"] != "SERVING"}
    unhealthy |= {u["service"] for u in result.unhealthy}
    return [
        target("fuzz: no INTERNAL/UNKNOWN", len(result.bad), 0),
        target("fuzz: no call over its deadline", len(result.over_deadline), 0),
        target("fuzz: no stream failing after it streamed", len(result.mid_stream), 0),
        target("fuzz: no process death", len(result.deaths), 0),
        target(
            "fuzz: every service SERVING after",
            sorted(unhealthy),
            [],
        ),
        target("fuzz: RSS back near baseline", sorted(n for n, ok in rss_ok.items() if not ok), []),
        target("fuzz: greedy output correct after", greedy["equal"], True),
    ]


def target(name: str, value: Any, expected: Any, passed: bool | None = None) -> dict:
    return {"name": name, "value": value, "expected": expected, "pass": value == expected if passed is None else passed}


RSS_RATIO, RSS_SLACK_MB = 0.10, 32.0  # a process is "back near its baseline" within 10% + 32 MB
WARMUP_CASES = 100


def run_all(
    stack: Stack,
    count: int = 1000,
    seed: int = 0,
    deadline_s: float = 15.0,
    sessions: int = 300,
    max_prompts: int = 100,
    stall_sizes_mb: Sequence[float] = (1, 4),
    only: Sequence[int] | None = None,
    oracle: Oracle = greedy_reference,
) -> dict:
    """The whole report: the fuzz run, then the issue's targets (each skipped when its count is 0)."""
    ready_after_s = wait_ready(stack)
    greedy_before = greedy_check(stack, oracle)
    rss_initial = rss_all(stack)
    # A warm-up round of other cases first, so the baseline holds what any first request allocates (pools,
    # caches, allocator arenas) and "back near the baseline" measures what the run itself keeps.
    warmup = run_fuzz(stack, WARMUP_CASES, seed + 1000, deadline_s) if only is None else None
    rss_before, health_before = settle_rss(stack, 1.0), health_all(stack)
    log.info("fuzz: %d cases, seed %d", count, seed)
    result = run_fuzz(stack, count, seed, deadline_s, only)
    greedy = greedy_check(stack, oracle)
    rss_after, health_after = settle_rss(stack, 3.0), health_all(stack)
    rss_ok = rss_within(rss_before, rss_after, RSS_RATIO, RSS_SLACK_MB)
    report: dict = {
        "fuzz": {
            "seed": seed,
            "deadline_s": deadline_s,
            **result.to_json(),
            "warmup": None if warmup is None else {"cases": warmup.cases, "seed": seed + 1000, "bad": warmup.bad},
            "health_before": health_before,
            "rss_mb_initial": rss_initial,
            "health_after": health_after,
            "rss_mb_before": rss_before,
            "rss_mb_after": rss_after,
            "rss_back_near_baseline": rss_ok,
            "rss_rule": f"after <= before * {1 + RSS_RATIO:g} + {RSS_SLACK_MB:g} MB (before: after the warm-up round; "
            "after: 3 s after the run)",
            "ready_after_s": ready_after_s,
            "greedy_before": greedy_before,
            "greedy_after": greedy,
        }
    }
    targets = fuzz_targets(result, health_after, greedy, rss_ok)
    if sessions:
        log.info("%d simultaneous new sessions", sessions)
        report["simultaneous_sessions"] = s = simultaneous_sessions(stack, sessions, oracle=oracle, seed=seed)
        name = f"{sessions} simultaneous new sessions: served or RESOURCE_EXHAUSTED"
        targets.append(target(name, s["codes"], None, s["pass"]))
    if max_prompts:
        log.info("%d maximum-size prompts", max_prompts)
        report["max_size_prompts"] = p = max_size_prompts(stack, max_prompts)
        rss = p["controller_rss_mb"]
        name = f"controller RSS within 10% of baseline after {max_prompts} rejected max-size prompts"
        targets.append(target(name, rss, None, p["pass"]))
    if stall_sizes_mb:
        log.info("event-loop stall of %s MB text prompts", ",".join(f"{s:g}" for s in stall_sizes_mb))
        report["event_loop_stall"] = stall = event_loop_stall(stack, stall_sizes_mb)
        for size in stall_sizes_mb:
            m = stall[f"{size:g}MB"]
            worst = max(m["max_chunk_gap_ms"] or 0.0, m["max_health_ms"] or 0.0)
            name = f"{size:g} MB text prompt stalls streams and health < {STALL_MS:g} ms"
            targets.append(target(name, worst, None, worst < STALL_MS))
    report["final"] = {
        "deaths": stack.dead(),
        "health": health_all(stack),
        "rss_mb": rss_all(stack),
        "greedy": greedy_check(stack, oracle),
    }
    targets.append(target("end: no process death", report["final"]["deaths"], {}))
    targets.append(target("end: greedy output correct", report["final"]["greedy"]["equal"], True))
    report["targets"] = targets
    return report


STALL_MS = 500.0  # the stall a large prompt may cause to other streams and to the health check


# -- command line ------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    from serving.local_stack import add_stack_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="controller HOST:PORT of a running stack")
    where.add_argument("--local-stack", action="store_true", help="start a LocalStack (loopback processes)")
    p.add_argument("--drafters-at", dest="target_drafters", default="", help="with --target: drafter addresses")
    p.add_argument("--verifiers-at", dest="target_verifiers", default="", help="with --target: verifier addresses")
    p.add_argument("--pids", default="", help="with --target: name=pid,... for RSS and deaths (controller=123)")
    p.add_argument("--count", type=int, default=1000, help="hostile requests of the fuzz run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=15.0, help="deadline of one hostile call, s")
    p.add_argument("--sessions", type=int, default=300, help="simultaneous new sessions (0: skip)")
    p.add_argument("--max-prompts", type=int, default=100, help="maximum-size prompts (0: skip)")
    p.add_argument("--stall-mb", default="1,4", help="text prompt sizes for the stall measure (empty: skip)")
    p.add_argument("--only", default="", help="replay only these case indices (comma list) of --count/--seed")
    p.add_argument("--out", default="loadtest/results/hostile.json")
    g = p.add_argument_group("--local-stack")
    add_stack_arguments(g, ".cache/hostile-stack-logs")
    args = p.parse_args(argv)
    if args.target and not (args.target_drafters or args.target_verifiers):
        p.error("--target needs --drafters-at and --verifiers-at (the internal services are fuzzed too)")
    return args


def local_stack(args: argparse.Namespace):
    """The LocalStack the flags describe; without --model-dir the default served model, in --dtype (float32
    by default, so its greedy output can be compared with transformers' float32 greedy decoding)."""
    from serving.local_stack import stack_from_args

    return stack_from_args(args, model_dtype=False)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    with ExitStack() as exits:
        if args.local_stack:
            local = local_stack(args)
            log.info("starting a LocalStack (%s, N=%d, %s) ...", args.model_dir, args.exit_layer, args.dtype)
            exits.enter_context(local)
            stack = Stack.from_local(local)
        else:
            pids = dict(item.split("=", 1) for item in args.pids.split(",") if item)
            stack = Stack(
                args.target,
                [a for a in args.target_drafters.split(",") if a],
                [a for a in args.target_verifiers.split(",") if a],
                args.model_dir,
                {name: int(pid) for name, pid in pids.items()},
            )
        started = time.perf_counter()
        report = run_all(
            stack,
            args.count,
            args.seed,
            args.deadline,
            args.sessions,
            args.max_prompts,
            [float(x) for x in args.stall_mb.split(",") if x.strip()],
            [int(x) for x in args.only.split(",") if x.strip()] or None,
        )
        report = {
            "environment": {
                "commit": commit(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(["python -m loadtest.hostile", *(argv if argv is not None else sys.argv[1:])]),
                "machine": machine(),
                "stack": {
                    "local": bool(args.local_stack),
                    "model": Path(stack.model_dir).name if stack.model_dir else None,
                    "model_dir": stack.model_dir,
                    "exit_layer": args.exit_layer,
                    "exit_head": args.exit_head or None,
                    "dtype": args.dtype if args.local_stack else None,
                    "drafters": len(stack.drafters),
                    "verifiers": len(stack.verifiers),
                    "state_store": "redis" if args.redis or "redis" in stack.processes else "memory",
                    "threads_per_process": args.threads if args.local_stack else None,
                },
                "seconds": round(time.perf_counter() - started, 1),
            },
            **report,
        }
        if args.local_stack:  # SIGTERM to all at once: they drain in parallel
            for process in stack.processes.values():
                if isinstance(process, subprocess.Popen) and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    print(out)
    failed = [t["name"] for t in report["targets"] if not t["pass"]]
    for name in failed:
        print(f"FAILED: {name}", file=sys.stderr)
    return 1 if failed else 0


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
