"""The breast-cancer example model without a registry: data, fixed split, training, metrics."""

from __future__ import annotations

import math
import re

import pandas as pd

from training import breast_cancer as bc


def test_feature_names_are_30_snake_case_identifiers() -> None:
    names = bc.feature_names()
    assert len(names) == 30 == len(set(names))
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", name) for name in names)
    assert names[0] == "mean_radius"
    assert "worst_concave_points" in names


def test_frame_has_float_features_and_string_labels() -> None:
    frame = bc.load_frame()
    assert list(frame.columns) == [*bc.feature_names(), bc.LABEL]
    assert len(frame) == 569
    assert all(frame[name].dtype == "float64" for name in bc.feature_names())
    assert frame[bc.LABEL].value_counts().to_dict() == {"benign": 357, "malignant": 212}


def test_split_is_deterministic_and_stratified() -> None:
    frame = bc.load_frame()
    train, test = bc.split(frame)
    again_train, again_test = bc.split(bc.load_frame())
    pd.testing.assert_frame_equal(train, again_train)
    pd.testing.assert_frame_equal(test, again_test)
    assert len(test) == math.ceil(len(frame) * bc.TEST_SIZE)  # 143, as sklearn rounds up
    assert len(train) + len(test) == len(frame)
    assert list(train.index) == list(range(len(train)))
    share = frame[bc.LABEL].value_counts(normalize=True)
    for part in (train, test):
        assert set(part[bc.LABEL]) == {"malignant", "benign"}
        part_share = part[bc.LABEL].value_counts(normalize=True)
        assert abs(part_share["malignant"] - share["malignant"]) < 0.01


def test_train_and_evaluate() -> None:
    train, test = bc.split(bc.load_frame())
    model = bc.train(train)
    predicted = model.predict(test[bc.feature_names()])
    assert set(predicted) <= {"malignant", "benign"}
    metrics = bc.evaluate(model, test)
    assert set(metrics) == {"test_accuracy", "test_f1_malignant", "test_roc_auc"}
    assert metrics["test_accuracy"] >= 0.95
    assert metrics["test_f1_malignant"] >= 0.9
    assert metrics["test_roc_auc"] >= 0.98
