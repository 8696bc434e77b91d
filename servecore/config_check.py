"""Strict validation of Serve config files: ``python -m servecore.config_check FILE [FILE ...]``.

Serve accepts misspelled keys silently (``num_replica``, ``num_gpu``…). This command checks every
key against Ray's own config schema, validates each application's ``args`` against the pydantic spec
of its builder, each deployment's ``user_config`` against the stage's live-knob model, and a few
rules that bite in practice: full ``ray_actor_options`` everywhere, and ``max_ongoing_requests``
large enough for the deployment's batches to fill.

Two checks need more than the file and run when asked (``make validate`` asks for both):

* ``--registry``: every model URI of every application resolves in the registry, and a generic
  model application's model has an MLflow signature (a model without one is refused: nothing says
  what it takes, so no input could be checked).
* ``--fit``: the replicas every application starts with (``num_replicas``, or autoscaling's
  ``initial_replicas``/``min_replicas``), all applications together, fit the CPUs and GPUs given
  (``--cpus``/``--gpus``; default: this machine's), and no single replica asks for more than that.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from servecore.errors import ConfigError

REQUIRED_ACTOR_OPTIONS = ("num_cpus", "num_gpus")


def load_config(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def find_app(config: dict[str, Any], app: str) -> dict[str, Any]:
    apps = config.get("applications") or []
    for entry in apps:
        if entry.get("name") == app:
            return entry
    names = [a.get("name") for a in apps]
    raise ConfigError(f"no application named {app!r} in the config (have {names})")


def load_builder(import_path: str) -> Callable[..., Any]:
    module_name, _, attr = import_path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import {import_path!r}: {e}") from e


def builder_args_type(builder: Callable[..., Any]) -> type[BaseModel] | None:
    """The pydantic model a builder takes, or None when ``import_path`` names a bound app."""
    if not inspect.isfunction(builder):
        return None
    params = list(inspect.signature(builder).parameters)
    if len(params) != 1:
        raise ConfigError(f"builder {builder.__name__} must take exactly one argument")
    annotation = typing.get_type_hints(builder).get(params[0])
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        raise ConfigError(
            f"builder {builder.__name__} must annotate its argument with a pydantic model"
        )
    return annotation


def _format_validation(prefix: str, error: ValidationError) -> list[str]:
    return [
        f"{prefix}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
        if e["loc"]
        else f"{prefix}: {e['msg']}"
        for e in error.errors()
    ]


def load_app_spec(path: str | Path, app: str) -> Any:
    """The validated pipeline spec of application ``app`` in config file ``path``."""
    entry = find_app(load_config(path), app)
    args_type = builder_args_type(load_builder(entry["import_path"]))
    if args_type is None:
        raise ConfigError(f"application {app!r} does not use a builder with pydantic args")
    try:
        return args_type.model_validate(entry.get("args") or {})
    except ValidationError as e:
        raise ConfigError("; ".join(_format_validation(f"{app}.args", e))) from e


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(pydantic model inside ``annotation``, whether it is a list of them)."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set):
        model, _ = _nested_model(typing.get_args(annotation)[0])
        return model, True
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model, is_list = _nested_model(arg)
            if model is not None:
                return model, is_list
        return None, False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def unknown_keys(model: type[BaseModel], data: Any, path: str) -> list[str]:
    """Keys in ``data`` that ``model`` (recursively) does not define, with a did-you-mean hint."""
    if not isinstance(data, dict):
        return []
    problems: list[str] = []
    fields = {name: f for name, f in model.model_fields.items()}
    for f in model.model_fields.values():
        if f.alias:
            fields[f.alias] = f
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{where}: unknown key{suggestion}")
            continue
        nested, is_list = _nested_model(fields[key].annotation)
        if nested is None:
            continue
        if is_list and isinstance(value, list):
            for i, item in enumerate(value):
                label = item.get("name", i) if isinstance(item, dict) else i
                problems.extend(unknown_keys(nested, item, f"{where}[{label}]"))
        else:
            problems.extend(unknown_keys(nested, value, where))
    return problems


def _check_deployment(
    app: str, deployment: dict[str, Any], builder_module: types.ModuleType
) -> list[str]:
    name = deployment.get("name", "?")
    where = f"applications[{app}].deployments[{name}]"
    problems: list[str] = []
    options = deployment.get("ray_actor_options")
    if not isinstance(options, dict):
        problems.append(f"{where}: state ray_actor_options in full (it replaces the code's dict)")
    else:
        for key in REQUIRED_ACTOR_OPTIONS:
            if key not in options:
                problems.append(f"{where}.ray_actor_options: missing {key} (state it explicitly)")
    schema_of = getattr(builder_module, "user_config_schema", None)
    if schema_of is None:
        return problems
    schema = schema_of(name)
    user_config = deployment.get("user_config")
    if user_config is not None:
        try:
            schema.model_validate(user_config)
        except ValidationError as e:
            problems.extend(_format_validation(f"{where}.user_config", e))
    batch_size = getattr(schema(), "max_batch_size", None)
    if isinstance(user_config, dict):
        batch_size = user_config.get("max_batch_size", batch_size)
    ongoing = deployment.get("max_ongoing_requests")
    # Stages run one @serve.batch at a time; the gateway's batch size counts texts, which bounds
    # its requests per batch too. Either way a replica must accept a full batch of calls.
    if isinstance(batch_size, int) and isinstance(ongoing, int) and ongoing < batch_size:
        problems.append(
            f"{where}.max_ongoing_requests: {ongoing} is below max_batch_size = {batch_size}; "
            "batches could never fill"
        )
    return problems


def check_config(path: str | Path) -> list[str]:
    """Every problem found in one config file (empty when it is valid)."""
    from ray.serve.schema import ServeDeploySchema

    try:
        config = load_config(path)
    except ConfigError as e:
        return [str(e)]
    problems = unknown_keys(ServeDeploySchema, config, "")
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        problems.extend(_format_validation("config", e))
    for entry in config.get("applications") or []:
        app = entry.get("name", "?")
        try:
            builder = load_builder(entry.get("import_path", ""))
            args_type = builder_args_type(builder)
        except ConfigError as e:
            problems.append(f"applications[{app}]: {e}")
            continue
        declared = [d.get("name") for d in entry.get("deployments") or []]
        spec = None
        if args_type is not None:
            try:
                spec = args_type.model_validate(entry.get("args") or {})
            except ValidationError as e:
                problems.extend(_format_validation(f"applications[{app}].args", e))
        if spec is not None:
            known = getattr(spec, "deployment_names", lambda: None)()
            if known is not None:
                for name in declared:
                    if name == "StreamConsumer" and name not in known:
                        problems.append(
                            f"applications[{app}].deployments[{name}]: the app has a stream "
                            "consumer only when INTENT_SERVING_STREAMS_URL is set"
                        )
                    elif name not in known:
                        problems.append(
                            f"applications[{app}].deployments[{name}]: no such deployment "
                            f"(the app has {known})"
                        )
        builder_module = sys.modules[builder.__module__]
        for deployment in entry.get("deployments") or []:
            problems.extend(_check_deployment(app, deployment, builder_module))
    return problems


def check_registry(path: str | Path) -> list[str]:
    """Every model URI of every application resolves; generic models have a signature."""
    from servecore.registry.client import resolve
    from servecore.traffic.releases import spec_model_uris

    problems: list[str] = []
    config = load_config(path)
    for entry in config.get("applications") or []:
        app = entry.get("name", "?")
        try:
            builder = load_builder(entry.get("import_path", ""))
            args_type = builder_args_type(builder)
            spec = args_type.model_validate(entry.get("args") or {}) if args_type else None
        except (ConfigError, ValidationError):
            continue  # reported by check_config
        if spec is None or not hasattr(spec, "stage_plans"):
            continue
        for uri in spec_model_uris(spec):  # type: ignore[arg-type]
            try:
                resolve(uri)
            except Exception as e:  # noqa: BLE001 - every failure is the operator's to read
                problems.append(f"applications[{app}]: {uri} does not resolve: {_message(e)}")
        registry_checks = getattr(sys.modules[builder.__module__], "registry_checks", None)
        if registry_checks is not None:
            problems.extend(f"applications[{app}]: {p}" for p in registry_checks(spec))
    return problems


def _message(error: Exception) -> str:
    return getattr(error, "message", None) or str(error)


def _replicas(deployment: dict[str, Any]) -> int:
    scaling = deployment.get("autoscaling_config")
    if isinstance(scaling, dict):
        found = scaling.get("initial_replicas", scaling.get("min_replicas", 1))
        return int(found if found is not None else 1)
    return int(deployment.get("num_replicas") or 1)


def check_fit(path: str | Path, cpus: float, gpus: float) -> list[str]:
    """What the applications start with fits ``cpus`` and ``gpus``; no replica asks for more."""
    problems: list[str] = []
    config = load_config(path)
    total = {"num_cpus": 0.0, "num_gpus": 0.0}
    have = {"num_cpus": cpus, "num_gpus": gpus}
    for entry in config.get("applications") or []:
        app = entry.get("name", "?")
        for deployment in entry.get("deployments") or []:
            options = deployment.get("ray_actor_options") or {}
            replicas = _replicas(deployment)
            for key in total:
                ask = float(options.get(key) or 0.0)
                total[key] += ask * replicas
                if ask > have[key]:
                    problems.append(
                        f"applications[{app}].deployments[{deployment.get('name')}]: one "
                        f"replica asks {key} = {ask:g}, more than the {have[key]:g} available; "
                        "it would stay pending forever"
                    )
    for key, asked in total.items():
        if asked > have[key] + 1e-9:
            problems.append(
                f"the applications start with {key} = {asked:g} in all, more than the "
                f"{have[key]:g} available; some replicas would stay pending"
            )
    return problems


def _local_gpus() -> int:
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch, no CUDA: no GPUs
        return 0


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m servecore.config_check")
    parser.add_argument("paths", nargs="*", metavar="CONFIG.yaml")
    parser.add_argument("--registry", action="store_true", help="check model URIs resolve")
    parser.add_argument("--fit", action="store_true", help="check the replicas fit the machine")
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1))
    parser.add_argument("--gpus", type=float, default=None)
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    paths = args.paths
    if not paths:
        print("usage: python -m servecore.config_check CONFIG.yaml [CONFIG.yaml ...]")
        return 2
    gpus = args.gpus if args.gpus is not None else float(_local_gpus()) if args.fit else 0.0
    failed = False
    for path in paths:
        problems = check_config(path)
        if not problems and args.registry:
            problems = check_registry(path)
        if not problems and args.fit:
            problems = check_fit(path, args.cpus, gpus)
        if problems:
            failed = True
            print(f"{path}: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  - {problem}")
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
