"""The gRPC contracts: generated code in step with protos/, every field and rpc commented, messages round-trip."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import kvrelay.v1
from kvrelay.internal.v1 import decode_pb2, kvstore_pb2, prefill_pb2
from kvrelay.v1 import common_pb2, gateway_pb2

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (Path("kvrelay") / "v1", Path("kvrelay") / "internal" / "v1")
PROTO_FILES = sorted(p for package in PACKAGES for p in (ROOT / "protos" / package).glob("*.proto"))
MODULES = {
    "common": common_pb2,
    "gateway": gateway_pb2,
    "prefill": prefill_pb2,
    "decode": decode_pb2,
    "kvstore": kvstore_pb2,
}


def test_every_proto_has_a_generated_module():
    assert sorted(p.stem for p in PROTO_FILES) == sorted(MODULES)


def test_generated_code_matches_protos(tmp_path):
    installed = metadata.version("grpcio-tools")
    if installed != kvrelay.v1.GRPC_TOOLS_VERSION:
        pytest.skip(
            f"kvrelay/v1 was generated with grpcio-tools {kvrelay.v1.GRPC_TOOLS_VERSION} but {installed} is installed; "
            "another version may write different bytes. Run scripts/gen_protos.py with the pinned version."
        )
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for package in PACKAGES:
        fresh = {p.name: p.read_bytes() for p in (tmp_path / package).iterdir() if p.is_file()}
        committed = {p.name: p.read_bytes() for p in (ROOT / package).iterdir() if p.is_file()}
        assert sorted(committed) == sorted(fresh), f"{package}: file list differs; run scripts/gen_protos.py"
        stale = [name for name in fresh if fresh[name] != committed[name]]
        assert not stale, f"{package}/{stale} differ from the .proto files; run scripts/gen_protos.py"


# --- every declaration commented -------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^(message|enum|service|oneof)\s+(\w+)\s*\{")
_FIELD = re.compile(r"^(?:optional\s+|repeated\s+)?(?:map\s*<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*\d+")
_ENUM_VALUE = re.compile(r"^(\w+)\s*=\s*-?\d+")
_RPC = re.compile(r"^rpc\s+(\w+)\s*\(")


def _declarations(text: str, package: str) -> list[tuple[str, str, int, bool]]:
    """(kind, full name, line number, commented) of every message, enum, service, field, enum value and rpc.

    A declaration is commented when the line before it is a `//` comment or the line itself ends with one.
    """
    found = []
    stack: list[tuple[str, str]] = []  # (kind, full name) of the open blocks; oneofs keep their message's name
    previous = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        code, _, trailing = raw.partition("//")
        line = code.strip()
        commented = (previous.startswith("//") and len(previous) > 2) or bool(trailing.strip())
        parent_kind, parent = stack[-1] if stack else ("file", package)
        if match := _BLOCK.match(line):
            kind, name = match.groups()
            full = parent if kind == "oneof" else f"{parent}.{name}"
            if kind != "oneof":
                found.append((kind, full, number, commented))
            if not line.endswith("}"):  # `message Empty {}` opens and closes on one line
                stack.append((kind if kind != "oneof" else parent_kind, full))
        elif line.startswith("}"):
            stack.pop()
        elif parent_kind == "message" and (match := _FIELD.match(line)):
            found.append(("field", f"{parent}.{match.group(1)}", number, commented))
        elif parent_kind == "enum" and (match := _ENUM_VALUE.match(line)):
            found.append(("enum value", f"{parent}.{match.group(1)}", number, commented))
        elif parent_kind == "service" and (match := _RPC.match(line)):
            found.append(("rpc", f"{parent}.{match.group(1)}", number, commented))
        previous = raw.strip()
    assert not stack, "unbalanced braces"
    return found


def _descriptor_names(module) -> set[tuple[str, str]]:
    """What protoc saw in one file: every (kind, full name) the parser above must also find."""
    names: set[tuple[str, str]] = set()

    def visit(message) -> None:
        names.add(("message", message.full_name))
        names.update(("field", field.full_name) for field in message.fields)
        for enum in message.enum_types:
            visit_enum(enum)
        for nested in message.nested_types:
            visit(nested)

    def visit_enum(enum) -> None:
        names.add(("enum", enum.full_name))
        # Enum values are scoped to the enum's parent in descriptors; the parser names them under the enum.
        names.update(("enum value", f"{enum.full_name}.{value.name}") for value in enum.values)

    file = module.DESCRIPTOR
    for message in file.message_types_by_name.values():
        visit(message)
    for enum in file.enum_types_by_name.values():
        visit_enum(enum)
    for service in file.services_by_name.values():
        names.add(("service", service.full_name))
        names.update(("rpc", method.full_name) for method in service.methods)
    return names


@pytest.mark.parametrize("proto", PROTO_FILES, ids=lambda p: p.name)
def test_every_declaration_is_commented(proto):
    text = proto.read_text()
    package = re.search(r"^package\s+([\w.]+)\s*;", text, re.MULTILINE).group(1)
    declarations = _declarations(text, package)
    # The parser must see exactly what protoc saw, or an uncommented field could hide from it.
    assert {(kind, name) for kind, name, _, _ in declarations} == _descriptor_names(MODULES[proto.stem])
    missing = [f"{proto.name}:{number}: {kind} {name}" for kind, name, number, ok in declarations if not ok]
    assert not missing, "declarations without a comment:\n" + "\n".join(missing)


def test_comment_parser_catches_a_missing_comment():
    text = "message A {\n  // documented\n  int32 x = 1;\n  int32 y = 2; // trailing is fine\n  int32 z = 3;\n}\n"
    flags = {name: ok for _, name, _, ok in _declarations(text, "p")}
    assert flags == {"p.A": False, "p.A.x": True, "p.A.y": True, "p.A.z": False}


# --- the contract's shape --------------------------------------------------------------------------------------------


def test_rpcs_and_streaming():
    def shape(module, service):
        methods = module.DESCRIPTOR.services_by_name[service].methods
        return {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in methods}

    assert shape(gateway_pb2, "Gateway") == {
        "Generate": ("GenerateRequest", "GenerateResponse", True),
        "Complete": ("GenerateRequest", "CompleteResponse", False),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False),
        "GetStatus": ("GetStatusRequest", "StatusResponse", False),
    }
    assert shape(prefill_pb2, "Prefill") == {
        "Prefill": ("PrefillRequest", "PrefillResponse", False),
        "Abort": ("AbortRequest", "AbortResponse", False),
    }
    assert shape(decode_pb2, "Decode") == {
        "Decode": ("DecodeRequest", "DecodeResponse", True),
        "Abort": ("AbortRequest", "AbortResponse", False),
    }
    assert shape(kvstore_pb2, "KVStore") == {"GetLayout": ("GetLayoutRequest", "Layout", False)}


@pytest.mark.parametrize(
    "inputs",
    [
        {"prompt": "The capital of France is"},
        {
            "messages": [
                gateway_pb2.ChatMessage(role="system", content="Be brief."),
                gateway_pb2.ChatMessage(role="user", content="Capital of France? é 漢字 🙂"),
            ]
        },
        {"prompt_token_ids": [1, 504, 3458, 282, 4649, 314, 0, 49151]},
    ],
    ids=["prompt", "messages", "prompt_token_ids"],
)
def test_generate_request_round_trip(inputs):
    request = gateway_pb2.GenerateRequest(
        **inputs,
        sampling=common_pb2.SamplingParams(temperature=0.0, top_k=-1, seed=2**64 - 1),
        max_tokens=16,
        stop=["\n\n", "."],
        stop_token_ids=[2],
        logprobs=0,
        request_id="req-1",
        session_id="sess-1",
    )
    parsed = gateway_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert parsed == request
    # Exactly the chosen input kind survives.
    assert parsed.prompt == inputs.get("prompt", "")
    assert list(parsed.messages) == list(inputs.get("messages", []))
    assert list(parsed.prompt_token_ids) == inputs.get("prompt_token_ids", [])
    # Explicit zeros are still "set" (proto3 optional); untouched fields are not.
    assert parsed.sampling.HasField("temperature") and parsed.sampling.temperature == 0.0
    assert parsed.HasField("logprobs") and parsed.logprobs == 0
    assert not parsed.sampling.HasField("top_p") and not parsed.sampling.HasField("repetition_penalty")
    assert parsed.sampling.seed == 2**64 - 1


def test_unset_optionals_mean_server_default():
    parsed = gateway_pb2.GenerateRequest.FromString(gateway_pb2.GenerateRequest(prompt="x").SerializeToString())
    assert not parsed.HasField("max_tokens") and not parsed.HasField("logprobs") and not parsed.HasField("sampling")
    assert not parsed.sampling.HasField("temperature")  # reading an unset sub-message gives its empty default
    assert not gateway_pb2.GenerateResponse().HasField("finish")
