"""Accuracy and depth targets over HTTP: resolved through the calibration table, reported in the reply."""

from __future__ import annotations

from tests.server.api.conftest import Served, assert_error


async def test_accuracy_target_picks_a_calibrated_speed_and_reports_it(served: Served) -> None:
    # The fake model's table has one point: normalized_entropy at speed 0.3, 1.0 pt below full depth.
    body = {"inputs": "hello there", "max_accuracy_drop": 1.5}
    response = await served.client.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["criterion"], body["speed"]) == ("normalized_entropy", 0.3)
    _, options = served.engine.calls[-1]
    assert (options.criterion, options.speed, options.speed_is_default) == ("normalized_entropy", 0.3, False)


async def test_depth_target(served: Served) -> None:
    response = await served.client.post("/v1/classify", json={"inputs": "x", "max_mean_exit_layer": 2})
    assert response.status_code == 200, response.text
    assert response.json()["speed"] == 0.3


async def test_unreachable_targets_name_the_best_reachable_value(served: Served) -> None:
    response = await served.client.post("/v1/classify", json={"inputs": "x", "max_accuracy_drop": 0.5})
    message = assert_error(response, 422, "invalid_request", "max_accuracy_drop")
    assert "smallest calibrated drop is 1.00 points" in message
    response = await served.client.post("/v1/classify", json={"inputs": "x", "max_mean_exit_layer": 1.2})
    message = assert_error(response, 422, "invalid_request", "max_mean_exit_layer")
    assert "lowest calibrated mean exit layer is 1.60" in message


async def test_invalid_target_combinations(served: Served) -> None:
    both = {"inputs": "x", "speed": 0.5, "max_accuracy_drop": 1.0}
    assert_error(await served.client.post("/v1/classify", json=both), 422, "invalid_request", "speed")
    for bad in [-1, "1", True]:
        response = await served.client.post("/v1/classify", json={"inputs": "x", "max_accuracy_drop": bad})
        assert response.status_code == 422 and response.json()["error"]["field"] == "max_accuracy_drop"
    response = await served.client.post("/v1/classify", json={"inputs": "x", "max_mean_exit_layer": 0.5})
    assert response.status_code == 422 and response.json()["error"]["field"] == "max_mean_exit_layer"
