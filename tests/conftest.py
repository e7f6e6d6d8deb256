import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def kfac_caplog(caplog):
    caplog.set_level(logging.INFO, logger="kfac")
    return caplog
