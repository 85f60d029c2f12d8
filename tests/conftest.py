import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use tiny models, where a second thread only adds contention (and on a shared machine, a lot)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
