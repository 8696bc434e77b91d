"""Strict config validation: shipped configs pass, typos Serve would ignore are caught."""

from __future__ import annotations

import copy

import pytest
import yaml

from servecore.config_check import check_config, load_app_spec, load_config, main
from servecore.errors import ConfigError
from servecore.settings import get_settings
from tests.conftest import ROOT, STAGES

SHIPPED = ["serve_config.yaml", "serve_config.gpu.yaml", "serve_config.onnx.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_valid(name):
    assert check_config(ROOT / name) == []


def test_cli_reports_ok_and_fails_on_problems(tmp_path, capsys):
    assert main([str(ROOT / n) for n in SHIPPED]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [{name: x, import_path: graphs.intent:build_app, argz: {}}]\n")
    assert main([str(bad)]) == 1
    assert "argz: unknown key (did you mean 'args'?)" in capsys.readouterr().out


def _variant(tmp_path, edit):
    config = copy.deepcopy(load_config(ROOT / "serve_config.yaml"))
    edit(config)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(config))
    return check_config(path)


def _deployment(config, name):
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def test_misspelled_keys_at_every_level_are_named(tmp_path):
    def edit(config):
        config["http_options"]["prot"] = 1
        encoder = _deployment(config, "Pipeline")
        encoder["num_replica"] = 1
        encoder["ray_actor_options"]["num_gpu"] = 1
        encoder["autoscaling_config"]["max_replica"] = 3

    problems = _variant(tmp_path, edit)
    assert "http_options.prot: unknown key (did you mean 'port'?)" in problems
    where = "applications[intent].deployments[Pipeline]"
    assert f"{where}.num_replica: unknown key (did you mean 'num_replicas'?)" in problems
    assert f"{where}.ray_actor_options.num_gpu: unknown key (did you mean 'num_gpus'?)" in problems
    assert (
        f"{where}.autoscaling_config.max_replica: unknown key (did you mean 'max_replicas'?)"
        in problems
    )


def test_args_are_validated_against_the_pipeline_spec(tmp_path):
    def typo(config):
        config["applications"][0]["args"]["encoder"]["devise"] = "cpu"

    def weights(config):
        config["applications"][0]["args"]["ensemble"]["weights"] = {"linear": 1.0}

    assert _variant(tmp_path, typo) == [
        "applications[intent].args.encoder.devise: Extra inputs are not permitted"
    ]
    assert _variant(tmp_path, weights) == [
        "applications[intent].args: Value error, ensemble.weights must name exactly the members "
        "['bow', 'linear', 'mlp'], got ['linear']"
    ]


def test_deployment_rules(tmp_path):
    def edit(config):
        encoder = _deployment(config, "Pipeline")
        encoder["max_ongoing_requests"] = 4
        encoder["user_config"]["max_batch_sizee"] = 8
        del _deployment(config, "Monitor")["ray_actor_options"]["num_gpus"]
        config["applications"][0]["deployments"].append(
            {"name": "Encoder", "ray_actor_options": {"num_cpus": 1, "num_gpus": 0}}
        )

    problems = _variant(tmp_path, edit)
    app = "applications[intent].deployments"
    assert f"{app}[Pipeline].user_config.max_batch_sizee: Extra inputs are not permitted" in (
        problems
    )
    assert f"{app}[Monitor].ray_actor_options: missing num_gpus (state it explicitly)" in problems
    # A stage inside a group has no deployment of its own to configure.
    assert any(p.startswith(f"{app}[Encoder]: no such deployment") for p in problems)
    assert (
        f"{app}[Pipeline].max_ongoing_requests: 4 is below max_batch_size = 8; "
        "batches could never fill"
    ) in problems


def _groups(tmp_path, groups):
    def edit(config):
        config["applications"][0]["args"]["groups"] = groups

    return _variant(tmp_path, edit)


ALL = ["Tokenizer", "Encoder", "LinearHead", "MLPHead", "BagOfWords", "Ensemble"]


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([{"name": "Pipeline", "stages": [*ALL, "Reranker"]}],
         "groups name unknown stages ['Reranker']"),
        ([{"name": "Pipeline", "stages": ALL}, {"name": "Again", "stages": ["Encoder"]}],
         "groups: stages ['Encoder'] are in more than one group"),
        ([{"name": "Pipeline", "stages": ALL[:-1]}],
         "groups: stages ['Ensemble'] are in no group; every stage needs one"),
        ([{"name": "Gateway", "stages": ALL}], "group name 'Gateway' is reserved"),
        ([{"name": "Encoder", "stages": ALL}],
         "group 'Encoder' has a stage's name but not just that stage"),
        # The ensemble needs the heads, the heads the encoder, the encoder the tokenizer.
        ([{"name": "Front", "stages": ["Tokenizer", "Ensemble", "BagOfWords"]},
          {"name": "Back", "stages": ["Encoder", "LinearHead", "MLPHead"]}],
         "groups: Front needs ['Back'], Back needs ['Front'] - groups cannot feed each other "
         "both ways"),
    ],
)  # fmt: skip
def test_groups_are_checked_against_the_stages(tmp_path, groups, message):
    (problem,) = _groups(tmp_path, groups)
    assert problem.startswith("applications[intent].args: Value error, " + message), problem


def test_every_grouping_orders_its_groups_by_what_they_read(tmp_path):
    spec = load_app_spec(ROOT / "serve_config.yaml", "intent")
    assert [(g.name, g.stage_names) for g in spec.group_plans()] == [("Pipeline", tuple(ALL))]
    split = spec.model_copy(update={"groups": None})
    assert [(g.name, g.stage_names) for g in split.group_plans()] == [(s, (s,)) for s in ALL]
    gpu = load_app_spec(ROOT / "serve_config.gpu.yaml", "intent")
    assert [(g.name, g.stage_names) for g in gpu.group_plans()] == [
        ("Preprocess", ("Tokenizer", "BagOfWords")),
        ("Encoder", ("Encoder",)),
        ("Postprocess", ("LinearHead", "MLPHead", "Ensemble")),
    ]
    # Written in any order, groups run in the order their inputs allow.
    reordered = [
        {"name": "Heads", "stages": ["Ensemble", "LinearHead", "MLPHead"]},
        {"name": "Text", "stages": ["BagOfWords", "Tokenizer", "Encoder"]},
    ]
    # Valid; only the deployments section still configures the shipped group.
    assert _groups(tmp_path, reordered) == [
        "applications[intent].deployments[Pipeline]: no such deployment "
        "(the app has ['Gateway', 'Text', 'Heads', 'JobRunner', 'Monitor'])"
    ]
    spec = spec.model_validate({**spec.model_dump(), "groups": reordered})
    assert [(g.name, g.stage_names) for g in spec.group_plans()] == [
        ("Text", ("Tokenizer", "Encoder", "BagOfWords")),
        ("Heads", ("LinearHead", "MLPHead", "Ensemble")),
    ]


def test_load_app_spec_returns_the_pipeline_spec():
    spec = load_app_spec(ROOT / "serve_config.yaml", "intent")
    plans = spec.stage_plans()
    assert [p.deployment for p in plans] == STAGES
    assert [p.output_prefix for p in plans[2:5]] == ["linear.", "mlp.", "bow."]
    with pytest.raises(ConfigError, match="no application named 'nope'"):
        load_app_spec(ROOT / "serve_config.yaml", "nope")


def test_a_device_on_a_text_member_is_refused_not_ignored(tmp_path):
    def edit(config):
        config["applications"][0]["args"]["members"][2]["device"] = "cuda"

    assert _variant(tmp_path, edit) == [
        "applications[intent].args.members.2: Value error, member 'bow': device applies to "
        "embedding members only; leave it unset"
    ]


def test_make_serve_runs_serve_as_the_tests_and_the_benchmark_do():
    """``make serve`` exports :data:`graphs.deploy.SERVE_ENV`, which the tests and the
    benchmark set for their own clusters: what is measured and tested is what ships."""
    import re

    from graphs.deploy import SERVE_ENV

    exported = dict(
        re.findall(r"^export (RAY_SERVE_\w+) \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    )
    assert exported == SERVE_ENV


def test_a_private_clusters_haproxy_ports_are_free_and_outside_the_ephemeral_range():
    """Ports the kernel hands out for ``bind(0)`` are handed out again (Ray's processes draw
    theirs there); HAProxy's come from below that range and are bindable when chosen."""
    import random
    import socket
    from pathlib import Path

    from graphs.deploy import HAPROXY_PORT_VARIABLES, quiet_port, serve_env

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    env = serve_env(lambda: quiet_port(random.Random(7)))
    ports = [int(env[name]) for name in HAPROXY_PORT_VARIABLES]
    assert all(1024 <= port < low for port in ports)
    with socket.socket() as taken:  # a port in use is never chosen
        taken.bind(("0.0.0.0", ports[0]))
        assert quiet_port(random.Random(7)) != ports[0]


def test_fit_check_refuses_replicas_the_machine_cannot_hold(tmp_path):
    from servecore.config_check import check_fit

    assert check_fit(ROOT / "serve_config.yaml", cpus=2, gpus=0) == []
    config = copy.deepcopy(load_config(ROOT / "serve_config.yaml"))
    cancer = next(a for a in config["applications"] if a["name"] == "breast-cancer")
    model = next(d for d in cancer["deployments"] if d["name"] == "Model")
    model["ray_actor_options"] = {"num_cpus": 3, "num_gpus": 0.5}
    path = tmp_path / "greedy.yaml"
    path.write_text(yaml.safe_dump(config))
    assert check_fit(path, cpus=2, gpus=0) == [
        "applications[breast-cancer].deployments[Model]: one replica asks num_cpus = 3, more "
        "than the 2 available; it would stay pending forever",
        "applications[breast-cancer].deployments[Model]: one replica asks num_gpus = 0.5, more "
        "than the 0 available; it would stay pending forever",
        "the applications start with num_cpus = 4 in all, more than the 2 available; some "
        "replicas would stay pending",
        "the applications start with num_gpus = 0.5 in all, more than the 0 available; some "
        "replicas would stay pending",
    ]
    assert check_fit(ROOT / "serve_config.gpu.yaml", cpus=16, gpus=1) == []


def test_a_stream_consumer_needs_a_redis_and_valid_knobs(tmp_path, monkeypatch):
    def edit(config):
        config["applications"][0]["deployments"].append(
            {
                "name": "StreamConsumer",
                "ray_actor_options": {"num_cpus": 0, "num_gpus": 0},
                "user_config": {"streams": [{"input": "tickets", "output": "tickets"}]},
            }
        )

    app = "applications[intent].deployments[StreamConsumer]"
    monkeypatch.delenv("INTENT_SERVING_STREAMS_URL", raising=False)
    get_settings.cache_clear()
    assert (
        f"{app}: the app has a stream consumer only when INTENT_SERVING_STREAMS_URL is set"
        in _variant(tmp_path, edit)
    )
    monkeypatch.setenv("INTENT_SERVING_STREAMS_URL", "redis://127.0.0.1:6379/0")
    get_settings.cache_clear()
    try:
        problems = _variant(tmp_path, edit)
    finally:
        monkeypatch.delenv("INTENT_SERVING_STREAMS_URL")
        get_settings.cache_clear()
    assert not any("only when INTENT_SERVING_STREAMS_URL" in p for p in problems)
    assert any(
        p.startswith(f"{app}.user_config.streams.0: Value error, input, output and dead_letter")
        for p in problems
    ), problems
