"""The proto is the reference for non-Python users: its stubs are current and every field is explained."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto" / "advserve" / "v1" / "advserve.proto"
OIP_PROTO = ROOT / "proto" / "inference" / "grpc_service.proto"  # the Open Inference Protocol (docs/oip.md)


def test_committed_stubs_equal_a_fresh_generation():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("proto", [PROTO, OIP_PROTO], ids=["advserve", "oip"])
def test_every_field_and_enum_value_of_the_proto_is_commented(proto):
    field = re.compile(r"^\s*(optional |repeated )?[A-Za-z][\w.<>, ]* \w+ = \d+;")
    uncommented = []
    lines = proto.read_text().splitlines()
    for number, line in enumerate(lines):
        if field.match(line) and "//" not in line:
            previous = lines[number - 1].strip()
            if not previous.startswith("//"):
                uncommented.append(f"{number + 1}: {line.strip()}")
    assert not uncommented, uncommented


def test_proto_style():
    text = PROTO.read_text()
    assert "package advserve.v1;" in text
    for enum in re.findall(r"enum (\w+) \{\s*\n\s*(\w+) = 0;", text):
        name, zero = enum
        assert zero.endswith("_UNSPECIFIED"), enum
    fields = re.findall(r"^\s*(?:optional |repeated )?[A-Za-z][\w.<>, ]* (\w+) = \d+;", text, re.M)
    assert all(f == f.lower() for f in fields), [f for f in fields if f != f.lower()]
