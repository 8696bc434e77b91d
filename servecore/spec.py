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

from servecore.registry import parse_model_uri

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


@dataclass(frozen=True)
class StagePlan:
    """One stage of the pipeline, in the form both Serve and Ray Data consume."""

    deployment: str
    stage_class: str
    init_kwargs: dict[str, Any]
    input: Literal["text", "tokens", "embedding", "members"]
    output_prefix: str = ""
    members: tuple[str, ...] = field(default_factory=tuple)


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
        return self

    def encoder_name(self) -> str:
        return parse_model_uri(self.encoder.model_uri)[0]

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
            ),
            StagePlan(
                deployment="Encoder",
                stage_class="deployments.encoder:Encoder",
                init_kwargs={
                    "model_uri": self.encoder.model_uri,
                    "device": self.encoder.device,
                    "max_rows_per_forward": self.encoder.max_rows_per_forward,
                },
                input="tokens",
            ),
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
                )
            )
        plans.append(
            StagePlan(
                deployment="Ensemble",
                stage_class="deployments.ensemble:Ensemble",
                init_kwargs={"weights": dict(self.ensemble.weights)},
                input="members",
                members=tuple(m.name for m in self.members),
            )
        )
        return plans

    def deployment_names(self) -> list[str]:
        return ["Gateway", *(p.deployment for p in self.stage_plans()), "JobRunner", "Monitor"]
