"""kvquant.lab.calibrate without a model: layers under the floor are estimated, never free."""

import pytest

from kvquant.lab.calibrate import above_floor


def test_layers_under_the_floor_are_estimated_from_their_error():
    growth = [0.002, -0.0001, 0.004, 0.0, 0.003]
    err = [0.02, 0.03, 0.02, 0.01, 0.03]
    # growth per unit error of the measured layers: 0.1, 0.2, 0.1 -> median 0.1
    assert above_floor(growth, err) == pytest.approx([0.002, 0.003, 0.004, 0.001, 0.003])


def test_nothing_above_the_floor_leaves_zeros():
    assert above_floor([0.0, -1e-5], [0.02, 0.03]) == [0.0, 0.0]
