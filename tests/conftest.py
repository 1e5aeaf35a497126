import pytest
import torch


@pytest.fixture(autouse=True)
def _small_threads():
    # Tests use tiny tensors: extra threads only add contention on small CI machines.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
