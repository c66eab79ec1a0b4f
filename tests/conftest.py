import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: thread overhead dominates


@pytest.fixture(scope="session")
def tiny_sd3():
    import flowalign as fa

    return fa.load_model("tiny-sd3")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
