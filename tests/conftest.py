import pytest
import torch

from masktune_core.sample_data import write_biased_digits


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # Two cores in CI: intra-op threads beyond that only add contention.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    """A small biased-digits dataset (CSV manifest with groups), shared read-only by the suite."""
    return write_biased_digits(tmp_path_factory.mktemp("data") / "digits", seed=0, n_train=300, n_val=100, n_test=80)
