"""The spec of a generic model application: any registered MLflow model, served by configuration.

It is the ``args:`` of an application whose ``import_path`` is ``graphs.model:build_app``::

    - name: fraud
      route_prefix: /fraud
      import_path: graphs.model:build_app
      args:
        model_uri: models:/fraud-score@champion

and drives the Serve application (``graphs/model.py``) and the batch job (``python -m batch run
--app fraud``) alike, as :class:`~servecore.pipeline.spec.PipelineSpec` does for the intent
pipeline: one stage, ``Model`` (:class:`deployments.pyfunc_model.PyfuncModel`), in a deployment of
its own, and optionally a ``Fallback`` stage running another model (or another version of the same
one) that answers when the primary fails, once ``fallback.stage: Fallback`` is set live in the
gateway's ``user_config``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from servecore.pipeline.spec import GroupPlan, StagePlan
from servecore.registry.client import parse_model_uri

MODEL_STAGE = "Model"
FALLBACK_STAGE = "Fallback"
STAGE_CLASS = "deployments.pyfunc_model:PyfuncModel"


class DriftSpec(BaseModel):
    """Where the drift monitor's reference profile comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference_data: str | None = None
    """A file (parquet, CSV or JSON lines; local path or any URI pyarrow reads) or an MLflow
    artifact URI (``runs:/<run>/reference/train.parquet``) holding the training rows. None: the
    model version's ``reference_data`` tag (the shipped example sets it), else no drift report."""
    label_column: str | None = None
    """A column of the reference data that is not an input (the target): left out of the
    profile. None: the version's ``label_column`` tag; columns that are not inputs are dropped
    anyway."""


class ModelAppSpec(BaseModel):
    """The ``args`` of a generic model application."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_uri: str
    """The registered model, by alias (``models:/name@alias``: follows the alias, hot swaps and
    rolls back with it) or by version (``models:/name/3``: pinned)."""
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """The model's name in OIP v2 (``/v2/models/<name>``); default: the registered name."""
    fallback_uri: str | None = None
    """Another registered model or version to answer when the primary fails or is late (enable
    with ``fallback: {stage: Fallback}`` in the gateway's ``user_config``)."""
    drift: DriftSpec = DriftSpec()

    @model_validator(mode="after")
    def _uris(self) -> ModelAppSpec:
        for uri in (self.model_uri, self.fallback_uri):
            if uri is not None:
                parse_model_uri(uri)
                if not uri.startswith("models:/"):
                    raise ValueError(f"{uri!r}: name a registered model (models:/name@alias)")
        if self.fallback_uri is not None and self.fallback_uri == self.model_uri:
            raise ValueError("fallback_uri must differ from model_uri")
        return self

    @property
    def registered_name(self) -> str:
        return parse_model_uri(self.model_uri)[0]

    @property
    def served_name(self) -> str:
        return self.name or self.registered_name

    def stage_plans(self) -> list[StagePlan]:
        plans = [
            StagePlan(MODEL_STAGE, STAGE_CLASS, {"model_uri": self.model_uri}, input="rows"),
        ]
        if self.fallback_uri is not None:
            plans.append(
                StagePlan(FALLBACK_STAGE, STAGE_CLASS, {"model_uri": self.fallback_uri}, "rows")
            )
        return plans

    def group_plans(self) -> list[GroupPlan]:
        """Each stage in a deployment of its own (the fallback must not share the primary's
        replicas: it answers when those fail)."""
        return [GroupPlan(plan.deployment, (plan,)) for plan in self.stage_plans()]

    def deployment_names(self) -> list[str]:
        return ["Gateway", *(g.name for g in self.group_plans()), "Monitor"]
