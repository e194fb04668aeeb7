#!/usr/bin/env python3
"""The numbers of docs/binary-framing.md, produced by code: the template docs/binary-framing.md.in with
every byte count, header, hex dump and offset of its examples filled in from the reference encoder
(advserve_client.framing) and from a real server's answers.

    python scripts/gen_docs.py            # exit 1 and a diff when docs/binary-framing.md is out of date
    python scripts/gen_docs.py --write    # rewrite it (`make docs`)
    python scripts/gen_docs.py --url http://127.0.0.1:8000   # ask that server instead of starting one

tests/test_docs.py renders the template against its own server and fails on any difference, so a
change of the server's response (a new key in `params`, say) cannot leave the page behind.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

import httpx
import numpy as np

from advserve_client import framing
from advserve_client.framing import RawTensor

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "docs" / "binary-framing.md.in"
DOC = ROOT / "docs" / "binary-framing.md"
BANNER = ("<!-- Generated from docs/binary-framing.md.in by `make docs` (scripts/gen_docs.py): edit the template; "
          "tests/test_docs.py fails when this file and the template's rendering differ. -->\n")
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def hexdump(data: bytes, start: int = 0) -> str:
    """`hexdump -C` of `data` placed at byte offset `start`: rows of 16 bytes from start // 16 * 16, blank
    cells before `start`, the printable ASCII column on the right."""
    lines = []
    end = start + len(data)
    for row in range(start - start % 16, end, 16):
        cells, text = [], ""
        for offset in range(row, row + 16):
            if start <= offset < end:
                byte = data[offset - start]
                cells.append(f"{byte:02x}")
                text += chr(byte) if 0x20 <= byte < 0x7F else "."
            else:
                cells.append("  ")
                text += " " if offset < start else ""
        hex_part = " ".join(cells[:8]) + "  " + " ".join(cells[8:])
        lines.append(f"{row:08x}  {hex_part}  |{text}|")
    return "\n".join(lines)


def span(first: int, size: int) -> str:
    """`0xA`–`0xB` (size): the offsets of `size` bytes from `first`, as the page's tables write them."""
    return f"`0x{first:02x}`–`0x{first + size - 1:02x}` ({size})"


def worked_request() -> tuple[int, bytes]:
    """The worked example of section 9: GRPO, two responses to one prompt, encoded by the reference codec."""
    n, chunks = framing.encode({"estimator": "grpo"}, {
        "rewards": RawTensor.from_numpy(np.array([1, 0], dtype=np.float32)),
        "response_mask": RawTensor.from_numpy(np.array([[1, 1], [1, 0]], dtype=bool)),
        "group_ids": ["q", "q"],
    })
    return n, b"".join(chunks)


def packed_request() -> tuple[int, bytes]:
    """The packed example of section 5: rows of 2 and 1 tokens."""
    n, chunks = framing.encode({"estimator": "grpo", "layout": "packed"}, {
        "rewards": RawTensor.from_numpy(np.array([1, 0], dtype=np.float32)),
        "cu_seqlens": RawTensor.from_numpy(np.array([0, 2, 3], dtype=np.int32)),
        "group_ids": ["q", "q"],
    })
    return n, b"".join(chunks)


def json_member(text: str, key: str) -> str:
    """The text `"key":{...}` of a compact JSON document, exactly as the server wrote it."""
    start = text.index(f'"{key}":')
    depth, i = 0, text.index("{", start)
    for i in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    raise ValueError(f"unbalanced JSON after {key!r}")


def values(url: str) -> dict[str, str]:
    """Every placeholder of the template: from the encoder, and from the server at `url`."""
    n, body = worked_request()
    headers = {"Content-Type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}
    with httpx.Client(base_url=url, timeout=60) as http:
        binary = http.post("/v1/advantages", content=body, headers=headers)
        as_json = http.post("/v1/advantages", content=body, headers={**headers, "Accept": "application/json"})
        packed_n, packed_body = packed_request()
        packed = http.post("/v1/advantages", content=packed_body, headers={
            "Content-Type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(packed_n), "Accept": "application/json"})
    for res in (binary, as_json, packed):
        if res.status_code != 200:
            raise RuntimeError(f"the server answered {res.status_code}: {res.text}")
    rn = int(binary.headers[framing.HEADER_LENGTH])
    response = binary.content
    descriptors = json.loads(response[:rn])["tensors"]
    names = list(descriptors)
    sizes = [descriptors[name]["binary_data_size"] for name in names]
    assert names == ["advantages", "returns"] and sum(sizes) == len(response) - rn, (names, sizes)
    packed_doc = packed.json()
    return {
        "request_n": str(n),
        "request_total": str(len(body)),
        "request_header": body[:n].decode(),
        "request_hexdump": hexdump(body),
        "request_header_span": span(0, n),
        "request_rewards_span": span(n, 8),
        "request_mask_span": span(n + 8, 4),
        "response_n": str(rn),
        "response_total": str(len(response)),
        "response_last": str(len(response) - 1),
        "response_content_length": binary.headers["content-length"],
        "response_header": response[:rn].decode(),
        "response_hexdump": hexdump(response[rn:], rn),
        "response_advantages_span": span(rn, sizes[0]),
        "response_returns_span": span(rn + sizes[0], sizes[1]),
        "response_advantages_words": ", ".join(f"`{response[i:i + 4].hex(' ')}`" for i in range(rn, rn + sizes[0], 4)),
        "response_json_tensors": json_member(as_json.text, "tensors"),
        "packed_header": packed_body[:packed_n].decode(),
        "packed_rewards_bytes": packed_body[packed_n:packed_n + 8].hex(" "),
        "packed_cu_seqlens_bytes": packed_body[packed_n + 8:].hex(" "),
        "packed_advantages": ", ".join(f"{v:g}" for v in packed_doc["tensors"]["advantages"]),
    }


def render(template: str, url: str) -> str:
    """The page: the banner, then the template with every {{name}} replaced (an unknown name is an error)."""
    known = values(url)
    unknown = sorted(set(PLACEHOLDER.findall(template)) - set(known))
    if unknown:
        raise KeyError(f"the template names unknown placeholders: {', '.join(unknown)}")
    return BANNER + PLACEHOLDER.sub(lambda m: known[m.group(1)], template)


def diff(expected: str, actual: str) -> str:
    return "".join(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                        "docs/binary-framing.md (now)", "docs/binary-framing.md (generated)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite docs/binary-framing.md")
    parser.add_argument("--url", help="an advserve server to ask (default: start one on free loopback ports)")
    args = parser.parse_args(argv)
    server = None
    if args.url is None:
        sys.path.insert(0, str(ROOT / "service"))
        from advserve.testing import ServerProcess

        server = ServerProcess(log_level="warning").start()
    try:
        page = render(TEMPLATE.read_text(), args.url or server.url)
    finally:
        if server is not None:
            server.stop()
            server.remove_log()
    current = DOC.read_text() if DOC.exists() else ""
    if page == current:
        print("docs/binary-framing.md is up to date")
        return 0
    if args.write:
        DOC.write_text(page)
        print("wrote docs/binary-framing.md")
        return 0
    sys.stdout.write(diff(page, current))
    print("docs/binary-framing.md is out of date: run `make docs`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
