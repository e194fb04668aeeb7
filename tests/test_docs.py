"""The documentation runs as written: every fenced code block of README.md, client/README.md and docs/*.md
is executed against a live server (python in a subprocess of this interpreter, bash with curl, JSON
requests posted), unless an HTML comment on the line before it says why not (`<!-- not run: WHY -->`);
documented outputs are compared with the real ones; docs/binary-framing.md is the rendering of its
template by scripts/gen_docs.py; README's configuration table lists every setting of `advserve serve`
with its default; the CLI's help says what the commands do.

Block kinds: ```python and ```bash run; ```json runs when marked `<!-- run: POST /path -->`; ```text is
not code (an HTTP head, a hex dump, a grammar). Any other block without a marker fails: mark it.
Addresses 127.0.0.1:8000 / 127.0.0.1:8001 (and localhost:...) in a block are replaced by the test
server's HTTP and gRPC ports.

Documented output: a python block whose last lines are comments right after a `print(` line expects
those comments as its stdout (Server-Timing durations aside); a bash block whose trailing comments hold
a JSON document expects every key of it in the real answer, and every literal array of numbers at that
key.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from advserve.analysis import report
from advserve.cli import build_parser
from advserve.config import Settings, env_name, setting_fields

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "client" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not run|run):\s*(?P<detail>.*?)\s*-->\s*$")
RUNNABLE = {"python", "bash"}
BLOCK_TIMEOUT_S = 180


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: tuple[str, str] | None  # ("not run" | "run", detail)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file (indented ones in lists too), with the marker comment on the
    nearest non-blank line before each."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, close = fence["indent"], re.compile(rf"^{fence['indent']}```\s*$")
        end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), None)
        assert end is not None, f"{path}:{i + 1}: the block never closes"
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        found.append(Block(path, i + 1, fence["lang"], body + "\n",
                           (marker["kind"], marker["detail"]) if marker else None))
        i = end + 1
    return found


ALL = [block for path in DOCS for block in blocks(path)]
# a block that appears in two files (README.md and client/README.md share some) runs once
_SEEN: set[str] = set()
RUN = [b for b in ALL if (b.marker is None and b.lang in RUNNABLE or b.marker and b.marker[0] == "run")
       and not (b.text in _SEEN or _SEEN.add(b.text))]
NOT_RUN = [b for b in ALL if b.marker and b.marker[0] == "not run"]


def for_server(text: str, server) -> str:
    """The block with the documented addresses pointed at the test server."""
    for host in ("127.0.0.1", "localhost"):
        text = text.replace(f"{host}:8000", f"127.0.0.1:{server.port}")
        text = text.replace(f"{host}:8001", f"127.0.0.1:{server.grpc_port}")
    return text


def environment() -> dict[str, str]:
    """This interpreter's bin first on PATH (python, advserve, curl from the system); no ADVSERVE_* leaks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADVSERVE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    return env


TIMING = re.compile(r"dur=\d+(\.\d+)?")


def documented_stdout(code: str) -> list[str] | None:
    """The trailing comment lines right after the block's last `print(` line, as output lines."""
    lines = code.rstrip("\n").splitlines()
    tail = []
    while lines and lines[-1].lstrip().startswith("#"):
        tail.insert(0, lines.pop())
    if not tail or not lines or "print(" not in lines[-1]:
        return None
    return [re.sub(r"^\s*# ?", "", line) for line in tail]


ANY = "\u2026any"  # what an elided `{...}` or `[...]` of a documented answer stands for


def documented_json(comment: str):
    """The JSON document of an answer as the docs show it: `{...}` and `[...]` stand for any value, a
    trailing `,...` for more keys."""
    text = comment.replace("{...}", json.dumps(ANY)).replace("[...]", json.dumps(ANY))
    return json.loads(re.sub(r",\s*\.\.\.\s*([}\]])", r"\1", text))


def check_documented_json(comment: str, answer, path: str = "") -> None:
    """Every key of the documented answer is in the real one, with an equal value (numbers compared as
    numbers: -0.0 == 0), except where the docs elide it."""
    expected = documented_json(comment) if isinstance(comment, str) and not path else comment
    if expected == ANY:
        return
    if isinstance(expected, dict):
        assert isinstance(answer, dict), f"{path or '/'}: expected an object, got {answer!r}"
        for key, value in expected.items():
            assert key in answer, f"{path}/{key}: documented, not in the answer {json.dumps(answer)[:1000]}"
            check_documented_json(value, answer[key], f"{path}/{key}")
    elif isinstance(expected, list):
        assert isinstance(answer, list) and len(answer) == len(expected), f"{path}: {expected} != {answer}"
        for i, (value, actual) in enumerate(zip(expected, answer)):
            check_documented_json(value, actual, f"{path}/{i}")
    else:
        assert expected == answer, f"{path}: documented {expected!r}, answered {answer!r}"


def run_python(block: Block, server, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(for_server(block.text, server))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=environment(), capture_output=True,
                          text=True, timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}\n{done.stderr}"
    expected = documented_stdout(block.text)
    if expected is not None:
        actual = [TIMING.sub("dur=…", line.rstrip()) for line in done.stdout.rstrip("\n").splitlines()]
        assert actual == [TIMING.sub("dur=…", line.rstrip()) for line in expected], \
            f"{block.id}: the documented output differs from the real one:\n{done.stdout}"


def run_bash(block: Block, server, tmp_path: Path) -> None:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", for_server(block.text, server)], cwd=tmp_path,
                          env=environment(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}\n{done.stderr}"
    comment = "\n".join(re.sub(r"^#\s?", "", line) for line in block.text.splitlines()
                        if line.startswith("# ") and line[2:].lstrip()[:1] in '{"')
    if comment:
        check_documented_json(comment, json.loads(done.stdout))


def run_request(block: Block, server) -> None:
    method, _, path = block.marker[1].partition(" ")
    assert method == "POST" and path.startswith("/"), f"{block.id}: run marker must be 'POST /path'"
    assert block.lang == "json", block.id
    res = httpx.post(server.url + path, content=block.text, headers={"content-type": "application/json"},
                     timeout=60)
    assert res.status_code == 200, f"{block.id}: {res.status_code} {res.text}"


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_block_runs_as_written(block, server, tmp_path):
    if block.marker is not None:
        run_request(block, server)
    elif block.lang == "python":
        run_python(block, server, tmp_path)
    else:
        run_bash(block, server, tmp_path)


def test_every_block_runs_or_says_why_not():
    unmarked = [b.id + f" (```{b.lang})" for b in ALL
                if b.marker is None and b.lang not in RUNNABLE and b.lang != "text"]
    assert not unmarked, ("blocks that are neither run nor marked: use ```python / ```bash, ```text for "
                          f"what is not code, or <!-- not run: WHY --> on the line before: {unmarked}")
    for block in NOT_RUN:
        assert len(block.marker[1]) > 10, f"{block.id}: say why it is not run"
        if block.lang == "python":
            ast.parse(block.text, filename=block.id)  # still valid Python
    assert len(RUN) >= 10  # the extraction finds the blocks


def test_python_blocks_define_every_name_they_use():
    """No NameError waiting for a reader who pastes a block (marked ones too): pyflakes' undefined names."""
    ruff = Path(sys.executable).parent / "ruff"
    problems = []
    for block in ALL:
        if block.lang != "python" or (block.marker and "excerpt" in block.marker[1]):
            continue
        done = subprocess.run([str(ruff), "check", "--select", "F821", "--output-format", "concise",
                               "--stdin-filename", "snippet.py", "-"], input=block.text, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            problems.append(f"{block.id}: {done.stdout.strip()}")
    assert not problems, "\n".join(problems)


def test_documented_output_checks_find_their_comments():
    assert documented_stdout('print(1)\n# 1\n') == ["1"]
    assert documented_stdout('x = 1\n# 1\n') is None
    answer = {"advantages": [[1.0, -0.0]], "stats": {"n": 2, "m": 3}, "returns": [[1.0, 0.0]]}
    check_documented_json('{"advantages":[[1,0]],"stats":{"n":2,...},"returns":[...]}', answer)
    with pytest.raises(AssertionError):
        check_documented_json('{"advantages":[[1,1]],"stats":{...}}', answer)
    with pytest.raises(AssertionError):
        check_documented_json('{"stats":{"n":3,...}}', answer)
    with pytest.raises(AssertionError):
        check_documented_json('{"nope":1}', answer)


# --- docs/binary-framing.md: produced by code --------------------------------------------------------


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_binary_framing_doc_is_the_rendering_of_its_template(server):
    gen_docs = _gen_docs()
    page = gen_docs.render(gen_docs.TEMPLATE.read_text(), server.url)
    current = gen_docs.DOC.read_text()
    assert page == current, ("docs/binary-framing.md differs from its template's rendering: run `make docs`\n"
                             + gen_docs.diff(page, current))


def test_hexdump_is_hexdump_c():
    gen_docs = _gen_docs()
    assert gen_docs.hexdump(b"{\"a\":1}\x00") == \
        '00000000  7b 22 61 22 3a 31 7d 00                           |{"a":1}.|'
    assert gen_docs.hexdump(b"\x01\x02", 17) == "00000010  " + "   01 02".ljust(48) + "  | ..|"


# --- README's configuration table against the settings -------------------------------------------


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


SIZES = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")


def _documented_default(text: str):
    text = text.strip().strip("`")
    if text in ("off", "on"):
        return text == "on"
    if m := re.fullmatch(r"(\d+) (KiB|MiB|GiB)", text):
        return int(m[1]) * SIZES[m[2]]
    if m := re.fullmatch(r"2([⁰¹²³⁴⁵⁶⁷⁸⁹]+)", text):
        return 2 ** int(m[1].translate(SUPERSCRIPT))
    try:
        return float(text)
    except ValueError:
        return text


def test_readme_configuration_table_lists_every_setting_with_its_default():
    rows = [line for line in _section((ROOT / "README.md").read_text(), "Configuration").splitlines()
            if line.startswith("| `")]
    defaults = Settings()
    documented_flags, documented_envs = set(), set()
    for row in rows:
        flags_cell, env_cell, default_cell = [cell.strip() for cell in row.strip("|").split("|")[:3]]
        flags = re.findall(r"--[a-z-]+", flags_cell)
        documented_flags.update(flags)
        documented_envs.update(re.findall(r"ADVSERVE_\w+", env_cell))
        for flag in flags:
            if flag.startswith("--no-"):
                continue
            name = flag[2:].replace("-", "_")
            assert hasattr(defaults, name), f"{flag} is no setting of advserve serve"
            if name == "admission_bytes":  # a quarter of RAM, capped: stated in words
                assert "RAM/4" in default_cell, row
                continue
            actual = getattr(defaults, name)
            documented = _documented_default(default_cell)
            if actual in ("", 0) and documented is False:  # "off"
                continue
            assert documented == actual or str(documented) == str(actual), (flag, default_cell, actual)
    expected_flags = {"--" + f.name.replace("_", "-") for f in setting_fields()} | {"--no-coalesce"}
    assert documented_flags == expected_flags, (sorted(expected_flags - documented_flags),
                                                sorted(documented_flags - expected_flags))
    assert documented_envs == {env_name(f.name) for f in setting_fields()}, \
        sorted({env_name(f.name) for f in setting_fields()} ^ documented_envs)


# --- the CLI's help ---------------------------------------------------------------------------------


def _help(command: str) -> str:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return subparsers.choices[command].format_help()


def test_serve_help_names_every_endpoint_of_the_readme():
    endpoints = re.findall(r"^\| `(?:POST|GET) (/v1/\w+|/metrics)`", _section((ROOT / "README.md").read_text(),
                                                                             "Endpoints"), re.M)
    assert len(endpoints) >= 5, endpoints
    text = " ".join(_help("serve").split())
    assert [e for e in endpoints if e not in text] == []


def test_analyze_help_states_true_defaults():
    text = " ".join(_help("analyze").split())
    assert "(default: True)" not in text and "(default: None)" not in text and "default: None" not in text
    assert "--no-plots" in text and "default: the plots are written" in text


# --- `advserve analyze`: its plots agree with its study.json --------------------------------------


def test_no_plots_run_removes_the_plots_of_an_earlier_run(tmp_path):
    for name in report.PLOTS:
        (tmp_path / name).write_bytes(b"\x89PNG stale")
    config = report.study_config("quick", group_sizes=(2,), replicates=20, blocks=2, estimators=("rloo",))
    report.run(config, tmp_path, plots=False, stream=io.StringIO(), progress_stream=io.StringIO())
    assert (tmp_path / "study.json").exists()
    assert [name for name in report.PLOTS if (tmp_path / name).exists()] == []


def test_coinciding_lines_are_grouped_for_one_labelled_line():
    references = {"rloo": [1.0, 1.0], "remax": [1.0000001, 1.0], "dr_grpo": [0.75, 0.875], "grpo": [1.6, 1.9],
                  "reinforce": [1.0, 1.0], "dapo": [0.75, 0.875004]}
    assert report.overlapping(references) == [["rloo", "remax", "reinforce"], ["dr_grpo", "dapo"]]
    assert report.overlapping({"a": [1.0], "b": [1.01]}) == []
