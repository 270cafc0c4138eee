"""The README's Deployment section matches the files: its commands, links and the dev
secret it tells you to mint compose tokens with."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.tools import ROOT

pytestmark = pytest.mark.deploy


def deployment_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Deployment\n")
    return text[start:text.index("\n## ", start + 1)]


def test_first_lines_are_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[3].startswith("make run ") and lines[4].startswith("make test ")


def test_all_three_ways_and_the_scaling_story() -> None:
    section = deployment_section()
    for command in ("make docker", "make build-prod", "docker compose up",
                    "kubectl apply -k k8s", "kubectl apply -k k8s/overlays/external-redis",
                    "kubectl apply -k k8s/overlays/servicemonitor", "secrets/jwt-secret.env",
                    "http://localhost:3000", "http://localhost:9090", "ws://localhost:8080/ws",
                    "monitoring/grafana-dashboard.json"):
        assert command in section, command
    assert "no sticky" in section and "backplane" in section


def test_links_exist() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", deployment_section()):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_the_token_command_uses_the_compose_secret() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    default = re.fullmatch(r"\$\{JWT_SECRET:-(.+)\}",
                           compose["services"]["signaling-1"]["environment"]["JWT_SECRET"])
    assert default
    assert f"JWT_SECRET={default.group(1)} " in deployment_section()
