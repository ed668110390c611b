"""`release`: the chart rendered on its defaults and on each example values file."""

import pytest
from deploy_helpers import EXAMPLES, Release, release_for


@pytest.fixture(params=(None, *EXAMPLES), ids=("default", *EXAMPLES))
def release(request) -> Release:
    return release_for(request.param)
