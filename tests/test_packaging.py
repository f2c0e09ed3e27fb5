"""The image and the set-up files stay in step with what CI runs (no Docker engine here to build it)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_installs_requirements_and_starts_app():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim AS build", text, re.M)
    assert "COPY requirements.txt" in text
    assert re.search(r"pip install .*-r requirements\.txt", text)
    assert re.search(r'^CMD \["python", "app.py"\]$', text, re.M), "exec-form CMD running app.py"
    assert re.search(r"^USER (?!root)\w+", text, re.M), "runs as a non-root user"
    assert re.search(r"^EXPOSE 8080 9090$", text, re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text
    copied = " ".join(re.findall(r"^COPY (?!--from|requirements)(.*)$", text, re.M))
    for needed in ("*.py", "wallet.proto", "openapi.json", "static"):
        assert needed in copied


def test_every_requirement_is_pinned():
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-schemathesis.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r "):
                assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.]+", line), f"{name}: {line!r} is not pinned with =="


def test_grpc_packages_move_together():
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    dev = dict(line.split("==") for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
               if "==" in line and not line.startswith("#"))
    assert pins["grpcio"] == pins["grpcio-health-checking"] == pins["grpcio-reflection"] == dev["grpcio-tools"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme.split("\n## ")[0] and "make test" in readme.split("\n## ")[0]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
