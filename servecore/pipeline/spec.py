"""The pipeline spec: one pydantic model that drives both the Serve graph and the Ray Data pipeline.

It is the ``args:`` of an application in ``serve_config.yaml`` (DESIGN contract 2). It names what
runs and from which registry URI; resources (``ray_actor_options``) and live knobs (``user_config``)
stay in the deployments section of the same application, where Serve expects them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from servecore.registry.client import parse_model_uri

Device = Literal["auto", "cpu", "cuda"]
_IDENTIFIER = r"^[a-z][a-z0-9_]{0,31}$"
_DEPLOYMENT = r"^[A-Z][A-Za-z0-9]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_uri(uri: str) -> str:
    parse_model_uri(uri)
    return uri


class TokenizerSpec(_Strict):
    model_uri: str = "models:/intent-encoder@champion"
    """Registered encoder model whose tokenizer files to use."""
    max_length: int = Field(default=256, ge=8, le=512)
    """Longer texts are truncated to this many tokens."""


class EncoderSpec(_Strict):
    model_uri: str = "models:/intent-encoder@champion"
    device: Device = "auto"
    max_rows_per_forward: int = Field(default=64, ge=1, le=1024)
    """Rows per forward pass; a batch is cut into chunks of similar length."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weight precision. float16 is for GPUs: on an H200 it doubled float32's rate from batch 128
    on, within cosine 0.999999 of the float32 embeddings (README, GPU); on CPUs it is slower."""
    runtime: Literal["torch", "onnx"] = "torch"
    """``onnx``: the edge bundle's encoder on onnxruntime (:class:`deployments.onnx_encoder.
    OnnxEncoder`, CPU); ``model_uri`` then names a registered edge bundle
    (``models:/intent-edge@edge``, made by ``python -m edge export``)."""

    @model_validator(mode="after")
    def _onnx_runs_on_cpu(self) -> EncoderSpec:
        if self.runtime == "onnx" and (self.device == "cuda" or self.dtype != "float32"):
            raise ValueError(
                "encoder runtime onnx runs on the CPU with the bundle's own weights: leave "
                "device and dtype unset"
            )
        return self


class MemberSpec(_Strict):
    """One voting member of the ensemble."""

    name: str = Field(pattern=_IDENTIFIER)
    """Short name used in ensemble weights and output columns (``<name>.probs``)."""
    deployment: str = Field(pattern=_DEPLOYMENT)
    """Serve deployment name (the key under ``deployments:`` in serve_config.yaml)."""
    input: Literal["embedding", "text"]
    """``embedding``: a head over encoder output; ``text``: a model on raw text."""
    model_uri: str
    device: Device = "auto"
    flavor: Literal["builtin", "pyfunc"] = "builtin"
    """``builtin``: the project's head or bag-of-words classes. ``pyfunc``: any MLflow pyfunc
    model on raw text (scikit-learn, ...): fed a one-column DataFrame of texts, it must return
    one probability per label (see ``deployments/pyfunc_member.py``)."""
    labels: list[str] | None = None
    """Order of a pyfunc model's probability columns; default: its ``labels`` metadata, else the
    columns' own names or the service's label order."""

    @model_validator(mode="after")
    def _uri(self) -> MemberSpec:
        _check_uri(self.model_uri)
        if self.flavor == "pyfunc" and self.input != "text":
            raise ValueError(f"member {self.name!r}: pyfunc members take input: text")
        if self.labels is not None and self.flavor != "pyfunc":
            raise ValueError(f"member {self.name!r}: labels applies to pyfunc members only")
        if self.input == "text" and self.device != "auto":
            raise ValueError(
                f"member {self.name!r}: device applies to embedding members only; leave it unset"
            )
        return self


class EnsembleSpec(_Strict):
    weights: dict[str, float]
    """Soft-vote weight per member name; normalised to sum to one."""


class GroupSpec(_Strict):
    """Stages that share one replica (one Serve deployment, one Ray Data actor pool): their plain
    classes run one after another in that process, on one batch, with no Ray hop between them."""

    name: str = Field(pattern=_DEPLOYMENT)
    """The group's deployment name (its key under ``deployments:`` in serve_config.yaml)."""
    stages: list[str] = Field(min_length=1)
    """Stage names (``Tokenizer``, ``Encoder``, the members' deployments, ``Ensemble``)."""


RESERVED_DEPLOYMENTS = frozenset({"Gateway", "JobRunner", "Monitor"})

_COLUMNS_OF_INPUT: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "tokens": ("input_ids", "attention_mask"),
    "embedding": ("embedding",),
}


@dataclass(frozen=True)
class StagePlan:
    """One stage of the pipeline, in the form both Serve and Ray Data consume."""

    deployment: str
    stage_class: str
    init_kwargs: dict[str, Any]
    input: Literal["text", "tokens", "embedding", "members", "rows"]
    """What the stage reads; ``rows``: every column of the request (a generic model's inputs)."""
    output_prefix: str = ""
    members: tuple[str, ...] = field(default_factory=tuple)
    outputs: tuple[str, ...] = field(default_factory=tuple)
    """Columns the stage adds to the batch (after ``output_prefix``)."""

    @property
    def reads(self) -> tuple[str, ...]:
        """Columns the stage's class is fed (the ensemble reads its members' probabilities)."""
        if self.input == "members":
            return tuple(f"{member}.probs" for member in self.members)
        if self.input == "rows":
            return ()
        return _COLUMNS_OF_INPUT[self.input]


@dataclass(frozen=True)
class GroupPlan:
    """One stage group as Serve and Ray Data run it: its stages in dependency order."""

    name: str
    stages: tuple[StagePlan, ...]

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(plan.deployment for plan in self.stages)


def load_stage_class(import_path: str) -> type:
    """``"package.module:Class"`` → the class (how stage plans name their classes)."""
    module_name, _, attr = import_path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"stage class {import_path!r} must look like 'package.module:Class'")
    return getattr(importlib.import_module(module_name), attr)


class PipelineSpec(_Strict):
    """The ``args`` of an intent-routing application."""

    tokenizer: TokenizerSpec = TokenizerSpec()
    encoder: EncoderSpec = EncoderSpec()
    members: list[MemberSpec] = Field(min_length=1)
    ensemble: EnsembleSpec
    groups: list[GroupSpec] | None = None
    """Which stages share a replica; ``None`` runs every stage in a deployment of its own (the
    fully split graph). Placement is configuration: see ``serve_config.yaml`` for the measured
    choice on CPUs and ``serve_config.gpu.yaml`` for GPUs."""

    @model_validator(mode="after")
    def _consistent(self) -> PipelineSpec:
        _check_uri(self.tokenizer.model_uri)
        _check_uri(self.encoder.model_uri)
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique: {names}")
        deployments = [m.deployment for m in self.members]
        reserved = {"Gateway", "Tokenizer", "Encoder", "Ensemble"}
        if len(set(deployments)) != len(deployments) or reserved & set(deployments):
            raise ValueError(
                f"member deployments must be unique and not one of {sorted(reserved)}: "
                f"{deployments}"
            )
        if set(self.ensemble.weights) != set(names):
            raise ValueError(
                f"ensemble.weights must name exactly the members {sorted(names)}, "
                f"got {sorted(self.ensemble.weights)}"
            )
        if any(w < 0 for w in self.ensemble.weights.values()) or not any(
            w > 0 for w in self.ensemble.weights.values()
        ):
            raise ValueError("ensemble.weights must be non-negative with at least one positive")
        self._check_groups()
        return self

    def _check_groups(self) -> None:
        if self.groups is None:
            return
        stages = [plan.deployment for plan in self.stage_plans()]
        named = [stage for group in self.groups for stage in group.stages]
        unknown = sorted(set(named) - set(stages))
        if unknown:
            raise ValueError(f"groups name unknown stages {unknown}; stages are {stages}")
        twice = sorted({stage for stage in named if named.count(stage) > 1})
        if twice:
            raise ValueError(f"groups: stages {twice} are in more than one group")
        missing = [stage for stage in stages if stage not in named]
        if missing:
            raise ValueError(f"groups: stages {missing} are in no group; every stage needs one")
        names = [group.name for group in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique: {names}")
        for group in self.groups:
            if group.name in RESERVED_DEPLOYMENTS:
                raise ValueError(f"group name {group.name!r} is reserved")
            if group.name in stages and group.stages != [group.name]:
                raise ValueError(
                    f"group {group.name!r} has a stage's name but not just that stage; "
                    "name it after what it holds (e.g. Pipeline)"
                )
        self.group_plans()  # refuses groups that need each other's outputs (a cycle)

    def group_plans(self) -> list[GroupPlan]:
        """The stage groups in an order where every group comes after those it reads from."""
        plans = self.stage_plans()
        by_name = {plan.deployment: plan for plan in plans}
        if self.groups is None:
            return [GroupPlan(plan.deployment, (plan,)) for plan in plans]
        producer = {column: plan.deployment for plan in plans for column in plan.outputs}
        group_of = {stage: g.name for g in self.groups for stage in g.stages}
        order = {plan.deployment: i for i, plan in enumerate(plans)}
        needs: dict[str, set[str]] = {g.name: set() for g in self.groups}
        for plan in plans:
            for column in plan.reads:
                source = producer.get(column)
                if source is not None and group_of[source] != group_of[plan.deployment]:
                    needs[group_of[plan.deployment]].add(group_of[source])
        ordered: list[GroupPlan] = []
        done: set[str] = set()
        pending = sorted(self.groups, key=lambda g: min(order[s] for s in g.stages))
        while pending:
            ready = next((g for g in pending if needs[g.name] <= done), None)
            if ready is None:
                raise ValueError(
                    "groups: "
                    + ", ".join(f"{g.name} needs {sorted(needs[g.name] - done)}" for g in pending)
                    + " - groups cannot feed each other both ways; regroup the stages"
                )
            pending.remove(ready)
            done.add(ready.name)
            members = sorted(ready.stages, key=order.__getitem__)
            ordered.append(GroupPlan(ready.name, tuple(by_name[s] for s in members)))
        return ordered

    def encoder_name(self) -> str:
        return parse_model_uri(self.encoder.model_uri)[0]

    def _encoder_plan(self) -> StagePlan:
        if self.encoder.runtime == "onnx":
            stage_class = "deployments.onnx_encoder:OnnxEncoder"
            kwargs: dict[str, Any] = {
                "model_uri": self.encoder.model_uri,
                "max_rows_per_forward": self.encoder.max_rows_per_forward,
            }
        else:
            stage_class = "deployments.encoder:Encoder"
            kwargs = {
                "model_uri": self.encoder.model_uri,
                "device": self.encoder.device,
                "max_rows_per_forward": self.encoder.max_rows_per_forward,
                "dtype": self.encoder.dtype,
            }
        return StagePlan(
            deployment="Encoder",
            stage_class=stage_class,
            init_kwargs=kwargs,
            input="tokens",
            outputs=("embedding", "num_tokens"),
        )

    def stage_plans(self) -> list[StagePlan]:
        """Stages in dependency order: tokenizer, encoder, members, ensemble."""
        plans = [
            StagePlan(
                deployment="Tokenizer",
                stage_class="deployments.tokenizer:Tokenizer",
                init_kwargs={
                    "model_uri": self.tokenizer.model_uri,
                    "max_length": self.tokenizer.max_length,
                },
                input="text",
                outputs=("input_ids", "attention_mask"),
            ),
            self._encoder_plan(),
        ]
        for member in self.members:
            if member.input == "embedding":
                stage_class = "deployments.heads:ClassifierHead"
                kwargs: dict[str, Any] = {"model_uri": member.model_uri, "device": member.device}
            elif member.flavor == "pyfunc":
                stage_class = "deployments.pyfunc_member:PyfuncMember"
                kwargs = {"model_uri": member.model_uri, "labels": member.labels}
            else:
                stage_class = "deployments.bag_of_words:BagOfWords"
                kwargs = {"model_uri": member.model_uri}
            plans.append(
                StagePlan(
                    deployment=member.deployment,
                    stage_class=stage_class,
                    init_kwargs=kwargs,
                    input=member.input,
                    output_prefix=f"{member.name}.",
                    outputs=(f"{member.name}.probs",),
                )
            )
        plans.append(
            StagePlan(
                deployment="Ensemble",
                stage_class="deployments.ensemble:Ensemble",
                init_kwargs={"weights": dict(self.ensemble.weights)},
                input="members",
                members=tuple(m.name for m in self.members),
                outputs=("probs", "label"),
            )
        )
        return plans

    def deployment_names(self) -> list[str]:
        from servecore.settings import get_settings

        # The stream consumer exists only with a Redis to read (graphs.intent.build_app).
        streams = ["StreamConsumer"] if get_settings().streams_url is not None else []
        return ["Gateway", *(g.name for g in self.group_plans()), "JobRunner", "Monitor", *streams]
