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


# For the modules that run a service stack: each defines its own module-scoped ``stack``.
@pytest.fixture(scope="module")
def client(stack):
    """An HTTP client with a fresh tenant's key on the module's stack."""
    with stack.client(stack.create_key("acme")) as client:
        yield client


@pytest.fixture(scope="module")
def dataset(client, tiny_digits):
    """The tiny digits dataset, uploaded and validated on the module's stack."""
    from test_service_e2e import upload_dataset, zip_dir

    ready = upload_dataset(client, zip_dir(tiny_digits))
    assert ready["status"] == "ready", ready
    return ready
