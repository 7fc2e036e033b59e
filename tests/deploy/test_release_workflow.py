"""The release workflow (.github/workflows/release.yaml): actionlint-clean, and it builds exactly the Containerfile
that test_deploy_tools.py lints with hadolint, for amd64 and arm64, with an SBOM, on a version tag only."""

from __future__ import annotations

import pathlib
import subprocess

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github/workflows/release.yaml"


def _workflow() -> dict:
    # PyYAML reads the key `on` as True.
    return yaml.safe_load(WORKFLOW.read_text())


def _build_steps() -> list[dict]:
    steps = [step for job in _workflow()["jobs"].values() for step in job["steps"]]
    return [s for s in steps if str(s.get("uses", "")).startswith("docker/build-push-action@")]


def test_workflows_pass_actionlint_with_shellcheck(tool):
    workflows = sorted((ROOT / ".github/workflows").glob("*.y*ml"))
    assert WORKFLOW in workflows
    done = subprocess.run(
        [tool("actionlint"), "-no-color", "-oneline", "-shellcheck", tool("shellcheck"), "-pyflakes=",
         *map(str, workflows)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_release_builds_the_linted_containerfile_for_amd64_and_arm64_with_an_sbom():
    (build,) = _build_steps()
    settings = build["with"]
    # The file test_deploy_tools.test_containerfile_passes_hadolint lints, from the repository root as context.
    assert (ROOT / settings["context"] / settings["file"]).resolve() == (ROOT / "Containerfile").resolve()
    assert settings["context"] == "."
    assert set(settings["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert settings["sbom"] is True
    assert settings["push"] is True
    assert "build-args" not in settings and "build-contexts" not in settings, "the Containerfile as it is linted"


def test_only_one_containerfile_exists():
    """Nothing else could be built instead of the linted file."""
    candidates = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                  if p.is_file() and p.name.lower().startswith(("dockerfile", "containerfile"))
                  and ".venv" not in p.parts and ".git" not in p.parts]
    assert candidates == ["Containerfile"]


def test_release_runs_on_version_tags_only_and_tags_the_charts_version():
    workflow = _workflow()
    assert workflow[True] == {"push": {"tags": ["v*.*.*"]}}
    assert workflow["permissions"] == {"contents": "read"}
    image = workflow["jobs"]["image"]
    assert image["needs"] == "check"
    assert image["permissions"] == {"contents": "read", "packages": "write"}
    values = yaml.safe_load((ROOT / "deploy/helm/nvdp/values.yaml").read_text())
    assert workflow["env"]["IMAGE"] == values["image"]["repository"]
    meta = next(s for s in image["steps"] if str(s.get("uses", "")).startswith("docker/metadata-action@"))
    # {{version}} drops the tag's "v": the bare version, the chart's default image.tag (its appVersion).
    assert meta["with"]["tags"].split()[0] == "type=semver,pattern={{version}}"
    check = "\n".join(s.get("run", "") for s in workflow["jobs"]["check"]["steps"])
    assert "appVersion" in check and "pytest tests/deploy" in check
