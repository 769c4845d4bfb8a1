import os

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU; this must be set before Triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
