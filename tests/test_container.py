"""The container image and the cluster-launcher configs hold together, checked without Docker.

The ``Dockerfile`` is linted with hadolint and read with the small parser below: what it copies
exists and reaches the build context past ``.dockerignore``, the modules it runs exist, the final
stage runs as a non-root user with a health check on ``/healthz``, every base image is a pinned
tag of the Ray that ``pyproject.toml`` pins, Serve runs as ``make serve`` runs it, and nothing that
looks like a secret is baked in. The launcher configs in ``cluster/launcher/`` pass the validation
``ray up`` runs before it touches a machine (Ray's defaults filled in, then Ray's JSON schema and
its own rules), and that validation does refuse a broken config.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
LAUNCHER_CONFIGS = sorted((ROOT / "cluster" / "launcher").glob("*.yaml"))
SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|SECRET", re.IGNORECASE)


# --- a small Dockerfile reader -------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and blank lines dropped (also
    between continuation lines, as Docker does). Parser directives count as comments here."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, arguments = " ".join(pending).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), arguments.strip()))
        pending = []
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def expand(text: str, values: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced as Docker replaces them (unknown names: empty)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), ""), text)


def assignments(instruction: Instruction) -> dict[str, str]:
    """``ARG NAME[=default]`` or ``ENV NAME=value ...`` (and the legacy ``ENV NAME value``)."""
    words = shlex.split(instruction.arguments)
    if instruction.keyword == "ENV" and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(w.partition("=")[::2] for w in words)


def split_stages(instructions: list[Instruction]) -> tuple[list[Instruction], list[Stage]]:
    """The ARGs before the first FROM (global), then one :class:`Stage` per FROM."""
    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.arguments.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            preamble.append(instruction)
    return preamble, stages


def global_args(preamble: list[Instruction], overrides: dict[str, str]) -> dict[str, str]:
    """The global ARGs' values with ``--build-arg`` overrides, each default expanded with the ARGs
    declared before it."""
    values: dict[str, str] = {}
    for instruction in preamble:
        assert instruction.keyword == "ARG", f"line {instruction.line}: only ARG may precede FROM"
        for name, default in assignments(instruction).items():
            values[name] = overrides.get(name, expand(default, values))
    return values


def copy_sources(instruction: Instruction) -> list[str]:
    """Sources of a COPY or ADD from the build context (``[]`` for ``--from`` copies)."""
    if "--from=" in instruction.arguments:
        return []
    words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
    if words and words[0].startswith("["):  # JSON form
        words = json.loads(instruction.arguments[instruction.arguments.index("[") :])
    return words[:-1]


def exec_form(instruction: Instruction) -> list[str]:
    arguments = instruction.arguments
    if instruction.keyword == "HEALTHCHECK":
        arguments = arguments[arguments.index("CMD ") + len("CMD ") :]
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[Instruction], list[Stage]]:
    return split_stages(parse_dockerfile(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def final(dockerfile) -> Stage:
    return dockerfile[1][-1]


def context_sources(stages: list[Stage]) -> list[str]:
    return [
        source
        for stage in stages
        for instruction in stage.instructions
        if instruction.keyword in ("COPY", "ADD")
        for source in copy_sources(instruction)
    ]


def image_environment(stage: Stage) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        values.update(assignments(instruction))
    return values


def test_the_parser_joins_continuations_and_skips_comments():
    text = 'FROM base AS b\n# note\nRUN a \\\n    # inside\n    && b\nCMD ["x", "y z"]\n'
    instructions = parse_dockerfile(text)
    assert [(i.line, i.keyword, i.arguments) for i in instructions] == [
        (1, "FROM", "base AS b"),
        (3, "RUN", "a && b"),
        (6, "CMD", '["x", "y z"]'),
    ]
    _, stages = split_stages(instructions)
    assert (stages[0].base, stages[0].name) == ("base", "b")
    assert exec_form(instructions[2]) == ["x", "y z"]


# --- .dockerignore, Docker's rules: the last pattern matching a path or a parent folder wins -----


def ignore_patterns(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        for token in re.findall(r"\*\*/|\*\*|\*|\?|\[[^\]]*\]|.", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, token if token.startswith("[") else re.escape(token)
            )
        patterns.append((negated, re.compile(regex)))
    return patterns


def excluded(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negated, regex in patterns:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            result = not negated
    return result


@pytest.fixture(scope="module")
def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    return ignore_patterns((ROOT / ".dockerignore").read_text())


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".venv-clients/bin/python",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/model.pt",
        "edge-bundle/manifest.json",
        "edge-channel/latest.json",
        ".edge/int8.onnx",
        ".gpu-bundle/model.safetensors",
        ".cache/models/x",
        ".jobs/jobs.db",
        ".predictions/log.jsonl",
        "bench/results/latest.json",
        "tests/test_layout.py",
        "intent_serving.egg-info/PKG-INFO",
        "servecore/__pycache__/settings.cpython-311.pyc",
        "servecore/api/proto/inference_pb2.py",
        "servecore/api/proto/inference_pb2_grpc.py",
        ".env",
        "cluster/launcher/serving.env",
        "deployments/.env.production",
        "cluster/tls.key",
        "README.md",
    ],
)
def test_the_build_context_leaves_out_state_secrets_and_tests(path, dockerignore):
    assert excluded(path, dockerignore)


def test_what_the_dockerfile_copies_exists_and_reaches_the_build_context(dockerfile, dockerignore):
    sources = context_sources(dockerfile[1])
    assert sources, "the Dockerfile copies nothing from the build context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not excluded(source, dockerignore), f"COPY {source}: left out by .dockerignore"
    # Every tracked file under what is copied (the .proto the stubs are compiled from, the data
    # the bootstrap reads...) is in the context, not only the folders themselves.
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--", *sources],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the files under each source were not checked")
    assert tracked
    assert [path for path in tracked if excluded(path, dockerignore)] == []


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint not found (pip install -e '.[dev]' installs it)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- the image's contents and settings ------------------------------------------------------------


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_ray_version() -> str:
    pins = [
        re.fullmatch(r"ray\[[^\]]*\]==([\w.]+)", d.replace(" ", ""))
        for d in pyproject()["project"]["dependencies"]
    ]
    versions = [m.group(1) for m in pins if m]
    assert len(versions) == 1, "pyproject.toml pins ray[...]== exactly once"
    return versions[0]


def documented_variants(preamble: list[Instruction]) -> list[str]:
    """The ARG's default and every ``--build-arg VARIANT=...`` the Dockerfile's comments show."""
    default = global_args(preamble, {})["VARIANT"]
    shown = re.findall(r"--build-arg VARIANT=([\w.-]+)", DOCKERFILE.read_text())
    assert shown, "the Dockerfile documents no build for another variant"
    return sorted({default, *shown})


def test_every_variant_builds_on_a_pinned_ray_image_of_the_pinned_release(dockerfile):
    preamble, stages = dockerfile
    ray = pinned_ray_version()
    variants = documented_variants(preamble)
    assert "cpu" in variants and any(v.startswith("cu") for v in variants)
    for variant in variants:
        values = global_args(preamble, {"VARIANT": variant})
        named = {s.name for s in stages if s.name}
        for stage in stages:
            base = expand(stage.base, values)
            if base in named:
                continue
            match = re.fullmatch(r"rayproject/ray:([\d.]+)-py311-([\w]+)", base)
            assert match, f"VARIANT={variant}: FROM {base} is not a pinned Ray image"
            assert match.groups() == (ray, variant), f"VARIANT={variant}: FROM {base}"


def test_the_image_pins_the_torch_and_project_versions_of_pyproject(dockerfile):
    from packaging.requirements import Requirement

    builder_args: dict[str, str] = {}
    for stage in dockerfile[1]:
        for instruction in stage.all("ARG"):
            builder_args.update(assignments(instruction))
    torch = next(
        Requirement(d) for d in pyproject()["project"]["dependencies"] if d.startswith("torch")
    )
    assert torch.specifier.contains(builder_args["TORCH_VERSION"])
    labels = " ".join(i.arguments for i in dockerfile[1][-1].all("LABEL"))
    assert f'org.opencontainers.image.version="{pyproject()["project"]["version"]}"' in labels


def test_the_final_stage_runs_as_a_non_root_user(final):
    users = final.all("USER")
    assert users, "the final stage names no USER"
    user = users[-1].arguments.split(":")[0]
    assert user not in ("root", "0")


def test_the_health_check_asks_the_gateways_liveness_route(final):
    (check,) = final.all("HEALTHCHECK")
    config = yaml.safe_load((ROOT / served_config(final)).read_text())
    port = config["http_options"]["port"]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(exec_form(check))


def served_config(final: Stage) -> str:
    (cmd,) = final.all("CMD")
    command = exec_form(cmd)
    assert command[:2] == ["serve", "run"], command
    return command[2]


def module_defines(module: str, attribute: str) -> bool:
    spec = importlib.util.find_spec(module)
    assert spec and spec.origin, f"{module}: no such module"
    tree = ast.parse(Path(spec.origin).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return attribute in names


def test_the_modules_the_image_runs_exist_and_are_copied(dockerfile, final):
    stages = dockerfile[1]
    copied = {Path(source).parts[0] for source in context_sources(stages)}
    commands = [i.arguments for s in stages for i in s.all("RUN")]
    modules = {m for text in commands for m in re.findall(r"python -m ([\w.]+)", text)}
    assert {"grpc_tools.protoc", "servecore.config_check"} <= modules
    for module in modules:
        assert importlib.util.find_spec(module), f"python -m {module}: no such module"
    project = {m for m in modules if (ROOT / m.split(".")[0]).is_dir()}
    assert {m.split(".")[0] for m in project} <= copied

    config_name = served_config(final)
    assert config_name in copied, f"serve run {config_name}: the config is not copied"
    config = yaml.safe_load((ROOT / config_name).read_text())
    targets = [app["import_path"] for app in config["applications"]]
    targets += [
        path.rsplit(".", 1)[0] + ":" + path.rsplit(".", 1)[1]
        for path in config.get("grpc_options", {}).get("grpc_servicer_functions", [])
    ]
    for target in targets:
        module, _, attribute = target.partition(":")
        assert module.split(".")[0] in copied, f"{target}: its package is not copied"
        assert module_defines(module, attribute), f"{target}: not defined"


def test_the_image_binds_the_configs_it_serves_to_every_interface(dockerfile):
    """Inside a container 127.0.0.1 reaches no client: the builder rewrites the host line."""
    run = " ".join(i.arguments for s in dockerfile[1] for i in s.all("RUN"))
    sed = re.search(r"sed -i 's/((?:[^/\\]|\\.)*)/((?:[^/\\]|\\.)*)/' (\S+)", run)
    assert sed, "no sed rewrite of the configs' host in the Dockerfile"
    pattern, replacement, files = sed.groups()
    configs = [c for c in context_sources(dockerfile[1]) if Path(c).match(files)]
    assert "serve_config.yaml" in configs
    for name in configs:
        rewritten = re.sub(pattern, replacement, (ROOT / name).read_text(), flags=re.MULTILINE)
        assert yaml.safe_load(rewritten)["http_options"]["host"] == "0.0.0.0", name


def test_serve_runs_as_make_serve_runs_it(final):
    from graphs.deploy import SERVE_ENV

    environment = image_environment(final)
    assert {name: environment.get(name) for name in SERVE_ENV} == SERVE_ENV


def test_the_image_bakes_in_no_secret_and_no_registry(dockerfile, final):
    preamble, stages = dockerfile
    named = [preamble, *(s.instructions for s in stages)]
    for instruction in (i for group in named for i in group if i.keyword in ("ARG", "ENV")):
        for name, value in assignments(instruction).items():
            assert not (SECRET_NAME.search(name) and value), f"line {instruction.line}: {name}"
    environment = image_environment(final)
    assert "MLFLOW_TRACKING_URI" not in environment  # from the environment at run time
    from servecore.settings import Settings

    fields = {f"INTENT_SERVING_{name.upper()}" for name in Settings.model_fields}
    assert {n for n in environment if n.startswith("INTENT_SERVING_")} <= fields


def test_the_secret_check_sees_a_baked_in_key():
    (instruction,) = parse_dockerfile("ENV INTENT_SERVING_WEBHOOK_SECRET=abc PATH=/bin\n")
    assert [n for n, v in assignments(instruction).items() if SECRET_NAME.search(n) and v] == [
        "INTENT_SERVING_WEBHOOK_SECRET"
    ]


# --- cluster launcher configs --------------------------------------------------------------------


def validate_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` checks before it touches a machine: Ray's defaults for the provider filled
    in (the local provider's single node type made), then Ray's schema and its own rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def test_both_launcher_configs_are_shipped():
    assert [p.name for p in LAUNCHER_CONFIGS] == ["aws.yaml", "local.yaml"]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_configs_pass_rays_validation(path):
    prepared = validate_launcher_config(load(path))
    # Ray's defaults (AWS: pip installs) are replaced: the image holds everything.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not [c for c in prepared[key] if "install" in c], key


def test_the_aws_config_has_a_head_a_cpu_and_a_gpu_worker_type():
    prepared = validate_launcher_config(load(ROOT / "cluster" / "launcher" / "aws.yaml"))
    types = prepared["available_node_types"]
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert sorted(t["resources"].get("GPU", 0) > 0 for t in workers.values()) == [False, True]
    assert all(t["max_workers"] > t["min_workers"] for t in workers.values())


def _set(path: list[str], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        for key in path[:-1]:
            config = config[key]
        config[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("name", "edit", "error"),
    [
        ("aws.yaml", _set(["idle_timeout_minute"], 5), "'idle_timeout_minute' was unexpected"),
        ("aws.yaml", _set(["max_workers"], "eight"), "'eight' is not of type 'integer'"),
        (
            "aws.yaml",
            _set(["available_node_types", "gpu_worker", "resources", "GPU"], 0.5),
            "0.5 is not of type 'integer'",
        ),
        ("aws.yaml", _set(["head_node_type"], "ray.head.default"), "must be one of"),
        ("local.yaml", _set(["docker", "imagee"], "x"), "'imagee' was unexpected"),
    ],
)
def test_rays_validation_refuses_a_broken_launcher_config(name, edit, error):
    config = load(ROOT / "cluster" / "launcher" / name)
    edit(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(error)):
        validate_launcher_config(config)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_configs_run_this_image_and_its_configs(path, dockerfile):
    config = load(path)
    ray = pinned_ray_version()
    images = [config["docker"]["image"]] + [
        t["docker"]["worker_image"]
        for t in config.get("available_node_types", {}).values()
        if "docker" in t
    ]
    variants = documented_variants(dockerfile[0])
    for image in images:
        assert re.search(rf":{re.escape(ray)}-({'|'.join(variants)})$", image), image
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    copied = set(context_sources(dockerfile[1]))
    for name in re.findall(r"/app/(\S+)", commands):
        assert name in copied, f"/app/{name}: not in the image"
    assert re.search(r"serve deploy /app/\S+", commands)
    # The settings file every shell in the container reads comes from a file mount.
    read = re.findall(r"\. (/\S+);", " ".join(config["setup_commands"]))
    assert read
    for settings in read:
        assert any(settings.startswith(f"{remote}/") for remote in config["file_mounts"])
