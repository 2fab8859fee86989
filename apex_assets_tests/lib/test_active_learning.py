"""Active learning (apex_assets.lib.active_learning): uncertainty, k-center greedy, selection,
the queue table, probabilities from PostgreSQL jsonb, and the strategy experiment."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math

import numpy as np
import polars as pl
import pytest

from apex_assets.lib import active_learning as al
from apex_assets.lib.active_learning import (
    ExperimentConfig,
    concat_queues,
    coverage_radius,
    empty_queue,
    experiment_markdown,
    experiment_plot,
    k_center_greedy,
    probabilities_matrix,
    queue_frame,
    run_experiment,
    select,
    uncertainty,
)
from apex_assets.lib.embeddings import fit_linear_probe, linear_probe

# --------------------------------------------------------------------------- uncertainty


def test_uncertainty_hand_values() -> None:
    probs = np.array(
        [
            [0.5, 0.3, 0.2],
            [1 / 3, 1 / 3, 1 / 3],
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.0],
        ]
    )
    np.testing.assert_allclose(uncertainty(probs), [0.8, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(uncertainty(probs, "margin"), [0.8, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(uncertainty(probs, "least_confidence"), [0.5, 2 / 3, 0.0, 0.5])
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)) / math.log(3)
    np.testing.assert_allclose(
        uncertainty(probs, "entropy"), [h, 1.0, 0.0, math.log(2) / math.log(3)]
    )
    assert uncertainty(np.zeros((0, 4))).shape == (0,)
    with pytest.raises(ValueError, match="2 classes"):
        uncertainty(np.ones((3, 1)))
    with pytest.raises(ValueError, match="unknown"):
        uncertainty(probs, "variance")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- k-center greedy


def test_k_center_hand_example_and_ties_to_lowest_index() -> None:
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    # From 0: farthest is 11 (row 3); then rows 1 and 2 are both 1 away -> row 1.
    assert k_center_greedy(x, 3) == [0, 3, 1]
    assert k_center_greedy(x, 2, first=2) == [2, 0]
    # Symmetric points around the start: -1 and +1 tie -> the lower index.
    line = np.array([[0.0], [1.0], [-1.0]])
    assert k_center_greedy(line, 2) == [0, 1]
    # With an initial set and no `first`, the first pick is the farthest from it.
    assert k_center_greedy(x, 1, initial=[0]) == [3]
    assert k_center_greedy(x, 2, initial=[0], first=1) == [1, 3]
    with pytest.raises(ValueError, match="already in initial"):
        k_center_greedy(x, 1, initial=[0], first=0)


def test_k_center_distinct_not_initial_and_all_remaining() -> None:
    x = np.random.default_rng(3).normal(size=(30, 5))
    initial = [4, 9, 17]
    picked = k_center_greedy(x, 10, initial=initial)
    assert len(picked) == 10
    assert len(set(picked)) == 10
    assert not set(picked) & set(initial)
    # k >= n: every row not in initial, once.
    everything = k_center_greedy(x, 100, initial=initial)
    assert sorted(everything) == sorted(set(range(30)) - set(initial))
    assert sorted(k_center_greedy(x, 30)) == list(range(30))
    assert k_center_greedy(x, 0) == []
    assert k_center_greedy(np.zeros((0, 3)), 5) == []
    # Deterministic.
    assert k_center_greedy(x, 10, initial=initial) == picked


def test_k_center_is_within_twice_the_optimal_radius() -> None:
    for seed in range(5):
        x = np.random.default_rng(seed).normal(size=(10, 2)) * [3.0, 1.0]
        optimal = min(coverage_radius(x, c) for c in itertools.combinations(range(10), 3))
        for first in range(10):
            greedy = coverage_radius(x, k_center_greedy(x, 3, first=first))
            assert optimal <= greedy <= 2 * optimal + 1e-12


def test_k_center_two_far_clusters_one_point_each() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 0.1, (20, 3))
    b = rng.normal(50.0, 0.1, (20, 3))
    x = np.concatenate([a, b])
    for first in (0, 7, 25):
        picked = k_center_greedy(x, 2, first=first)
        assert sorted(i < 20 for i in picked) == [False, True]


def test_k_center_chunked_distances_give_the_same_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    whole = k_center_greedy(x, 12, initial=[3, 5])
    monkeypatch.setattr(al, "_DISTANCE_CHUNK_VALUES", 24)  # 3 rows per chunk
    assert k_center_greedy(x, 12, initial=[3, 5]) == whole


# --------------------------------------------------------------------------- select


def near_duplicates_case() -> tuple[np.ndarray, np.ndarray]:
    """Rows 0-3: the four most uncertain, near-duplicates (one lighting fault).
    Rows 4 and 5: a bit less uncertain, each in its own far corner. Rows 6-9: confident."""
    probs = np.array(
        [
            [0.50, 0.49, 0.01],
            [0.51, 0.48, 0.01],
            [0.49, 0.50, 0.01],
            [0.52, 0.47, 0.01],
            [0.60, 0.39, 0.01],
            [0.30, 0.65, 0.05],
            [0.98, 0.01, 0.01],
            [0.97, 0.02, 0.01],
            [0.01, 0.98, 0.01],
            [0.01, 0.01, 0.98],
        ]
    )
    features = np.array(
        [
            [0.00, 0.00],
            [0.01, 0.00],
            [0.00, 0.01],
            [0.01, 0.01],
            [10.0, 0.00],
            [0.00, 10.0],
            [30.0, 30.0],  # far, but confident: outside the uncertain pool
            [5.0, 5.0],
            [6.0, 6.0],
            [7.0, 7.0],
        ]
    )
    return probs, features


def test_select_uncertainty_picks_the_smallest_margins() -> None:
    probs, features = near_duplicates_case()
    # Margins: 0.01, 0.03, 0.01, 0.05, 0.21, 0.35, ... -> rows 0 and 2 tie (lower first).
    assert select(probs, None, 4, strategy="uncertainty") == [0, 2, 1, 3]
    assert select(probs, features, 2, strategy="uncertainty") == [0, 2]


def test_select_diversity_spreads_over_the_uncertain_pool() -> None:
    probs, features = near_duplicates_case()
    # Pool = 2 * 3 most uncertain = rows 0-5; start at row 0, then the two far corners.
    assert select(probs, features, 3, strategy="diversity", pool_factor=2) == [0, 4, 5]
    # Pure uncertainty spends the whole budget on near-duplicates.
    assert select(probs, features, 3, strategy="uncertainty") == [0, 2, 1]
    # A labelled image in the (10, 0) corner: that corner is covered, spend elsewhere.
    labelled = np.array([[10.0, 0.1]])
    picked = select(probs, features, 2, strategy="diversity", pool_factor=3, labelled=labelled)
    assert picked == [0, 5]
    # The pool is the most uncertain rows only: the far, confident row 6 is never chosen.
    assert 6 not in select(probs, features, 4, strategy="diversity", pool_factor=1)
    with pytest.raises(ValueError, match="features"):
        select(probs, None, 2, strategy="diversity")


def test_select_random_and_budget_edges() -> None:
    probs = np.full((20, 2), 0.5)
    first = select(probs, None, 8, strategy="random", seed=4)
    assert len(first) == len(set(first)) == 8
    assert all(0 <= i < 20 for i in first)
    assert select(probs, None, 8, strategy="random", seed=4) == first
    assert select(probs, None, 8, strategy="random", seed=5) != first
    assert sorted(select(probs, None, 50, strategy="random")) == list(range(20))
    assert select(probs, None, 0, strategy="uncertainty") == []
    assert select(probs[:0], None, 3, strategy="uncertainty") == []
    with pytest.raises(ValueError, match="strategy"):
        select(probs, None, 2, strategy="greedy")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- probabilities


def test_probabilities_matrix_from_json_strings_and_structs() -> None:
    frame = pl.DataFrame(
        {
            "probabilities": [
                json.dumps({"CRACK": 0.7, "NO_DEFECT": 0.2, "BURR": 0.1}),
                json.dumps({"NO_DEFECT": 0.9, "CRACK": 0.1}),  # BURR missing -> 0
                json.dumps({"CRACK": 0.2, "BURR": 0.2, "NO_DEFECT": 0.1}),  # sums to 0.5
            ]
        }
    )
    matrix, classes = probabilities_matrix(frame)
    assert classes == ["BURR", "CRACK", "NO_DEFECT"]
    np.testing.assert_allclose(matrix, [[0.1, 0.7, 0.2], [0.0, 0.1, 0.9], [0.4, 0.4, 0.2]])

    # jsonb read as Python dicts becomes a Polars struct; missing fields are nulls. (Built
    # row-wise: a column of dicts, pl.DataFrame({"p": dicts}), keeps only the first dict's keys.)
    dicts = [{"CRACK": 0.7, "NO_DEFECT": 0.3}, {"NO_DEFECT": 1.0}, {"BURR": 0.5, "CRACK": 0.5}]
    structs = pl.DataFrame([{"p": d} for d in dicts])
    assert isinstance(structs.schema["p"], pl.Struct)
    matrix, classes = probabilities_matrix(structs, "p")
    assert classes == ["BURR", "CRACK", "NO_DEFECT"]
    np.testing.assert_allclose(matrix, [[0.0, 0.7, 0.3], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])

    with pytest.raises(ValueError, match="no probabilities"):
        probabilities_matrix(pl.DataFrame({"probabilities": ['{"A": 1}', None]}))
    with pytest.raises(ValueError, match="JSON"):
        probabilities_matrix(pl.DataFrame({"probabilities": ["{not json"]}))
    with pytest.raises(ValueError, match="summing to 0"):
        probabilities_matrix(pl.DataFrame({"probabilities": ['{"A": 0, "B": 0}']}))


# --------------------------------------------------------------------------- queue


def test_queue_frame_in_pick_order_with_reasons() -> None:
    t = dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.UTC)
    candidates = pl.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "image_path": ["cam1/a.png", "cam1/b.png", "cam2/c.png"],
            "camera_id": ["cam1", "cam1", "cam2"],
            "predicted_class": ["CRACK", "NO_DEFECT", "SURFACE_SCRATCH"],
            "overall_confidence": [0.48, 0.9, 0.5],
            "predicted_at": [t, t, t],
            "probabilities": ["{}", "{}", "{}"],  # extra column, not in the queue
        }
    )
    classes = ["CRACK", "NO_DEFECT", "SURFACE_SCRATCH"]
    probs = np.array([[0.48, 0.08, 0.44], [0.05, 0.9, 0.05], [0.3, 0.2, 0.5]])
    queue = queue_frame(candidates, probs, [2, 0], strategy="uncertainty", classes=classes)
    assert queue.columns == [
        "rank",
        "image_id",
        "image_path",
        "camera_id",
        "predicted_class",
        "overall_confidence",
        "predicted_at",
        "margin",
        "entropy",
        "strategy",
        "reason",
    ]
    assert queue["rank"].to_list() == [1, 2]
    assert queue["image_id"].to_list() == ["c", "a"]
    np.testing.assert_allclose(queue["margin"].to_numpy(), [0.2, 0.04])
    np.testing.assert_allclose(queue["entropy"].to_numpy(), uncertainty(probs[[2, 0]], "entropy"))
    assert queue["reason"].to_list() == [
        "margin 0.20 between SURFACE_SCRATCH and CRACK",
        "margin 0.04 between CRACK and SURFACE_SCRATCH",
    ]
    assert queue["strategy"].to_list() == ["uncertainty"] * 2
    assert queue["predicted_at"].to_list() == [t, t]
    empty = queue_frame(candidates, probs, [], strategy="diversity", classes=classes)
    assert empty.height == 0
    assert empty.columns == queue.columns
    # queues one after the other are ranked again; an empty one has the same columns
    both = concat_queues(
        queue_frame(candidates, probs, [1], strategy="first", classes=classes), queue
    )
    assert both["rank"].to_list() == [1, 2, 3] and both["image_id"].to_list() == ["b", "c", "a"]
    assert both.schema == queue.schema
    assert empty_queue(candidates).schema == queue.schema and empty_queue(candidates).height == 0
    with pytest.raises(ValueError, match="classes"):
        queue_frame(candidates, probs, [0], strategy="x", classes=classes[:2])
    with pytest.raises(ValueError, match="lack"):
        queue_frame(candidates.drop("camera_id"), probs, [0], strategy="x", classes=classes)


# --------------------------------------------------------------------------- probe + experiment


def blobs(n: int, seed: int, k: int = 3, d: int = 4, spread: float = 1.5):
    centers = np.random.default_rng(100).normal(0.0, 1.0, (k, d)) * 2.0
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    return (centers[y] + rng.normal(0.0, spread, (n, d))).astype(np.float32), y


def test_fit_linear_probe_matches_linear_probe() -> None:
    train_x, train_y = blobs(90, 1)
    test_x, test_y = blobs(60, 2)
    probe = fit_linear_probe(train_x, train_y, ["a", "b", "c"], epochs=40, seed=2)
    proba = probe.predict_proba(test_x)
    assert proba.shape == (60, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(probe.predict(test_x), proba.argmax(axis=1))
    assert probe.classes == ("a", "b", "c")
    assert probe.train_images == 90
    result = linear_probe(train_x, train_y, test_x, test_y, ["a", "b", "c"], epochs=40, seed=2)
    assert result.accuracy == float((probe.predict(test_x) == test_y).mean())


def test_run_experiment_table_costs_growth_and_determinism() -> None:
    pool_x, pool_y = blobs(240, 1)
    test_x, test_y = blobs(300, 2)
    config = ExperimentConfig(budgets=(6, 30, 150), initial=6, repeats=3, probe_epochs=60)
    table = run_experiment(pool_x, pool_y, test_x, test_y, ["a", "b", "c"], config)
    assert table.columns == [
        "strategy",
        "labels",
        "accuracy_mean",
        "accuracy_std",
        "label_cost",
        "repeats",
    ]
    assert table.height == 3 * 3 + 1
    assert table["strategy"].to_list() == ["random"] * 3 + ["uncertainty"] * 3 + [
        "diversity"
    ] * 3 + ["all labels"]
    assert table["labels"].to_list() == [6, 30, 150] * 3 + [240]
    assert table["label_cost"].to_list() == [12.0, 60.0, 300.0] * 3 + [480.0]
    assert set(table["repeats"].to_list()) == {3}
    for strategy in ("random", "uncertainty", "diversity"):
        acc = table.filter(pl.col("strategy") == strategy)["accuracy_mean"].to_list()
        assert acc[0] < acc[1] < acc[2], (strategy, acc)
    # Every strategy starts from the same random images in each repeat.
    starts = table.filter(pl.col("labels") == 6)
    assert starts["accuracy_mean"].n_unique() == 1
    assert starts["accuracy_std"].n_unique() == 1
    ceiling = table.filter(pl.col("strategy") == "all labels").row(0, named=True)
    assert ceiling["accuracy_mean"] > 0.7
    assert table.filter(pl.col("labels") == 6)["accuracy_mean"][0] < ceiling["accuracy_mean"]

    again = run_experiment(pool_x, pool_y, test_x, test_y, ["a", "b", "c"], config)
    assert again.equals(table)
    other_seed = ExperimentConfig(
        budgets=(6, 30, 150), initial=6, repeats=3, probe_epochs=60, seed=1
    )
    assert not run_experiment(pool_x, pool_y, test_x, test_y, ["a", "b", "c"], other_seed).equals(
        table
    )
    with pytest.raises(ValueError, match="exceeds the pool"):
        run_experiment(pool_x[:100], pool_y[:100], test_x, test_y, ["a", "b", "c"], config)


def test_experiment_config_validation() -> None:
    with pytest.raises(ValueError, match="increase"):
        ExperimentConfig(budgets=(30, 30), initial=10)
    with pytest.raises(ValueError, match="below initial"):
        ExperimentConfig(budgets=(5, 30), initial=10)
    with pytest.raises(ValueError, match="strategies"):
        ExperimentConfig(budgets=(30,), initial=10, strategies=("random", "magic"))


def test_experiment_markdown_and_plot() -> None:
    table = pl.DataFrame(
        {
            "strategy": ["random", "random", "diversity", "diversity", "all labels"],
            "labels": [30, 60, 30, 60, 1200],
            "accuracy_mean": [0.5, 0.6, 0.5, 0.7, 0.9],
            "accuracy_std": [0.01, 0.02, 0.01, 0.015, 0.0],
            "label_cost": [60.0, 120.0, 60.0, 120.0, 2400.0],
            "repeats": [3] * 5,
        }
    )
    assert experiment_markdown(table).splitlines() == [
        "| strategy | labelled images | accuracy | label cost ($) |",
        "| --- | ---: | ---: | ---: |",
        "| random | 30 | 0.500 ± 0.010 | 60 |",
        "| random | 60 | 0.600 ± 0.020 | 120 |",
        "| diversity | 30 | 0.500 ± 0.010 | 60 |",
        "| diversity | 60 | 0.700 ± 0.015 | 120 |",
        "| all labels | 1,200 | 0.900 ± 0.000 | 2,400 |",
    ]
    png = experiment_plot(table, title="NEU-DET")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert experiment_plot(table, title="NEU-DET") == png  # same input, same bytes
    with pytest.raises(ValueError, match="lacks"):
        experiment_plot(table.drop("label_cost"), title="x")
