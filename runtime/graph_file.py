"""A bundle's ONNX graph as untrusted input: every weight inside the file, no control flow.

ONNX lets a tensor keep its bytes in another file ("external data": a path relative to the graph, in the tensor's
`external_data` entries). An engine that follows such a path reads whatever it names: `../../secret.bin`, or a
link in the bundle that leads out. ONNX Runtime 1.17 (the oldest this runtime claims) follows it, and so does
`onnx.load`. trm-export writes every weight inside its graphs, so a graph that refers to any external data is
refused here, before an engine or the onnx package sees it, and engines get the bytes read here instead of a path
they could resolve on their own.

A step is a fixed sequence of network calls, so a graph with a Loop, Scan or If node (a Loop can run without end
and hang `run` and `verify`) is refused the same way.

The check walks the protobuf wire format itself (no onnx package on a device): every tensor the format can hold,
in the graph, in node attributes, in subgraphs (If / Loop / Scan bodies, to any depth), in sparse tensors, model
functions and training graphs.
"""

from __future__ import annotations

from pathlib import Path

from trm_export.errors import BundleError

# The message types that can hold a TensorProto, and which of their fields hold which message (onnx.proto's field
# numbers). Every other field is skipped without being decoded.
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_EXTERNAL_DATA = 13  # repeated StringStringEntryProto: location, offset, length
_TENSOR_DATA_LOCATION = 14  # enum: 0 DEFAULT, 1 EXTERNAL
_MAX_DEPTH = 64  # nested subgraphs; our step graphs have none
_NODE_OP_TYPE = 4
# A step is a fixed sequence of network calls: control flow has no place in it, and a Loop can run without end.
_CONTROL_FLOW = {b"Loop", b"Scan", b"If"}
_EXTERNAL, _CONTROL = "external data", "control flow"  # the two reasons a graph is refused


class _Malformed(Exception):
    pass


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed("a truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _refusal(data: memoryview, kind: str, depth: int) -> tuple[str, str] | None:
    """What makes this message unfit for a step graph, as (_EXTERNAL or _CONTROL, where it was found), or None."""
    if depth > _MAX_DEPTH:
        raise _Malformed(f"subgraphs nested deeper than {_MAX_DEPTH}")
    children = _CHILDREN.get(kind, {})
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            if kind == "tensor" and number == _TENSOR_DATA_LOCATION and value == 1:
                return _EXTERNAL, "a tensor whose data_location is EXTERNAL"
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            end = pos + length
            if end > len(data):
                raise _Malformed("a field runs past the end of the file")
            if kind == "tensor" and number == _TENSOR_EXTERNAL_DATA:
                return _EXTERNAL, "a tensor with external_data entries"
            if kind == "node" and number == _NODE_OP_TYPE and bytes(data[pos:end]) in _CONTROL_FLOW:
                return _CONTROL, f"a {bytes(data[pos:end]).decode()} node"
            child = children.get(number)
            if child:
                found = _refusal(data[pos:end], child, depth + 1)
                if found:
                    return found
            pos = end
        else:  # 3 / 4: protobuf groups, which ONNX never uses; 6 / 7 do not exist
            raise _Malformed(f"wire type {wire}")
        if pos > len(data):
            raise _Malformed("a field runs past the end of the file")
    return None


def check_self_contained(data: bytes, where: str | Path) -> None:
    """Refuse (BundleError) an ONNX model whose tensors refer to external data, that has control flow, or that is
    not a protobuf."""
    try:
        found = _refusal(memoryview(data), "model", 0)
    except _Malformed as exc:
        raise BundleError(f"{where}: not an ONNX model ({exc}); re-export the bundle") from None
    if found is None:
        return
    reason, place = found
    if reason == _EXTERNAL:
        raise BundleError(f"{where}: the graph refers to weights outside its file ({place}); a bundle's graphs "
                          "hold every weight themselves, so this one is refused unread; re-export the bundle")
    raise BundleError(f"{where}: the graph has {place} (control flow, which can run without end); a step "
                      "graph is a fixed sequence of network calls, so this one is refused; re-export the bundle")


def read_graph(path: Path) -> bytes:
    """The bytes of the graph file at `path`, refused unless every weight is inside it (what engines are given)."""
    data = Path(path).read_bytes()
    check_self_contained(data, path)
    return data
