"""`Recipe.ema`: the moving average of the trained weights that a run validates and writes."""

from __future__ import annotations

import pytest
import torch

from taskmux.cli import main
from taskmux.modelrepo.multitask import Average


def _net() -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    for p in net[0].parameters():
        p.requires_grad_(False)  # a frozen part, as the trunk: never averaged
    return net


def test_the_average_follows_the_weights_and_forgets_the_start_at_once() -> None:
    net = _net()
    average = Average(net, decay=0.9)
    trained = net[1].weight
    start = trained.detach().clone()
    with torch.no_grad():
        trained.fill_(1.0)
    average.update()  # first step: decay (1 + 1) / (10 + 1), not 0.9
    with average.applied():
        first = net[1].weight.detach().clone()
    assert torch.allclose(first, start * 2 / 11 + 9 / 11)
    assert torch.allclose(trained, torch.ones_like(trained))  # its own weights are back
    for _ in range(200):
        average.update()
    with average.applied():
        assert torch.allclose(net[1].weight, torch.ones_like(trained), atol=1e-3)
    assert len(average.params) == 2  # the second layer's weight and bias only


def test_the_net_gets_its_own_weights_back_even_when_the_block_fails() -> None:
    net = _net()
    average = Average(net, decay=0.5)
    with torch.no_grad():
        net[1].bias.fill_(3.0)
    own = net[1].bias.detach().clone()
    with pytest.raises(RuntimeError, match="validation failed"), average.applied():
        assert not torch.allclose(net[1].bias, own)
        raise RuntimeError("validation failed")
    assert torch.allclose(net[1].bias, own)


def test_the_flag_refuses_a_decay_outside_zero_to_one(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("1", "-0.1", "many"):
        with pytest.raises(SystemExit):
            main(["model", "train-multitask", "--ema", bad, "--tiny"])
        assert "is not a decay: give 0 (off) up to below 1" in capsys.readouterr().err
