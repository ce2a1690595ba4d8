"""The Docker images' own steps, run here (no Docker engine runs on these machines).

Each Dockerfile's COPY lines lay out its /app in a temporary directory; the worker then runs
from that tree alone, so a module the image lacks (or one imported from tests/ or tools/)
fails here as it would on RunPod. Dockerfile.build-download's bake step runs with its ARG and
ENV values, and the baked model then serves with its source gone.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.fixtures.ldm import write_checkpoint
from tests.helpers import ROOT, RangeServer, worker_env

DOCKERFILES = ("Dockerfile", "Dockerfile.build-download")


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n", " ", (ROOT / dockerfile).read_text())
    lines = (line.strip() for line in text.splitlines())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def lay_out(dockerfile: str, root: Path) -> Path:
    """/app as the Dockerfile's COPY lines fill it (WORKDIR /app)."""
    app = root / "app"
    app.mkdir(parents=True)
    for word, args in instructions(dockerfile):
        if word != "COPY":
            continue
        *sources, dest = args.split()
        into_dir = dest.endswith("/") or dest == "." or len(sources) > 1
        for source in sources:
            target = app / dest / Path(source).name if into_dir else app / dest
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, target)
    return app


def build_env(dockerfile: str, build_args: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """What RUN steps see (ARG and ENV values) and what the container starts with (ENV only)."""
    args, env = {}, {}
    for word, rest in instructions(dockerfile):
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = build_args.get(name, json.loads(default) if default else "")
        elif word == "ENV":
            for pair in rest.split():
                name, _, value = pair.partition("=")
                env[name] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), env.get(m.group(1), "")), value)
    unknown = set(build_args) - set(args)
    assert not unknown, f"{dockerfile} has no ARG for {unknown}: docker would ignore them with a warning"
    return args | env, env


def run_in(app: Path, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *argv], cwd=app, env=env, capture_output=True, text=True, timeout=300)


def test_the_image_runs_test_input_from_its_own_files(models_dir, tmp_path):
    app = lay_out("Dockerfile", tmp_path)
    assert not (app / "tests").exists() and not (app / "tools").exists()
    done = run_in(app, worker_env(models_dir), "handler.py")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (app / "output" / "local_test-0.png").is_file()


def test_both_images_hold_the_same_worker():
    def copies(dockerfile: str) -> list[str]:
        return [args for word, args in instructions(dockerfile) if word == "COPY"]

    assert copies("Dockerfile") == copies("Dockerfile.build-download")


def test_a_checkpoint_baked_at_build_serves_without_its_source(tmp_path):
    """docker-diffusers-api's MODEL_ID + CHECKPOINT_URL build, as --build-arg values."""
    from builder import tiny_model

    source = tiny_model.ensure(tmp_path / "configs", sd_layout=True)
    server = RangeServer({"/finetune.safetensors": write_checkpoint(source, tmp_path / "f.safetensors").read_bytes()})
    app = lay_out("Dockerfile.build-download", tmp_path)
    run_env, image_env = build_env("Dockerfile.build-download", {
        "MODEL_ID": str(source), "CHECKPOINT_URL": server.url + "/finetune.safetensors", "MODEL_PRECISION": "fp32",
    })
    image_env["BAKED_DIR"] = run_env["BAKED_DIR"] = str(tmp_path / "baked-models")  # /baked-models in the image
    base = worker_env(tmp_path / "no-volume")
    baked = run_in(app, base | run_env, "-m", "builder.download")
    assert baked.returncode == 0, baked.stdout[-2000:] + baked.stderr[-2000:]
    server.close()  # from here on, a fetch of the checkpoint would fail

    served = run_in(app, base | image_env, "handler.py")
    assert served.returncode == 0, served.stdout[-2000:] + served.stderr[-2000:]
    assert "'source': 'baked'" in served.stdout  # the SDK prints the job's result
    assert not (tmp_path / "no-volume" / "checkpoints").exists()


def _imports(paths: list[Path]) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _requirement_closure() -> set[str]:
    """The distributions pip installs for requirements.txt: those listed, and what they need."""
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    todo = [re.split(r"[=<>\[ ;]", line)[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    seen: set[str] = set()
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [re.split(r"[=<>!~\[ ;(]", r)[0] for r in requires if "extra ==" not in r]
    return seen


def test_what_the_image_imports_comes_with_its_requirements(tmp_path):
    app = lay_out("Dockerfile", tmp_path)
    ours = {p.name for p in app.iterdir()} | {p.stem for p in app.glob("*.py")}
    third_party = _imports(list(app.rglob("*.py"))) - set(sys.stdlib_module_names) - ours
    owners = metadata.packages_distributions()
    installed = _requirement_closure()
    missing = {name: owners.get(name) for name in third_party
               if not any(re.sub(r"[-_.]+", "-", d).lower() in installed for d in owners.get(name, []))}
    assert not missing, f"imported by the worker but not installed by requirements.txt: {missing}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_no_credential_is_a_build_arg_or_env(dockerfile):
    """Build arguments and ENV land in the image's history: secrets go through --secret only."""
    names = [rest.partition("=")[0] for word, rest in instructions(dockerfile) if word == "ARG"]
    names += [pair.partition("=")[0]
              for word, rest in instructions(dockerfile) if word == "ENV" for pair in rest.split()]
    assert not [n for n in names if re.search(r"TOKEN|SECRET|KEY|PASSWORD", n)], names
