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


def untrained_lora_parameters(train) -> tuple[object, list[str]]:
    """Run ``train()`` and return its :class:`~flowalign.trainers.loop.Run` and the trainable parameters that did not
    change. SD3's last block discards its context stream, so the LoRA on that block's context-query projection
    gets no gradient and is left out."""
    from flowalign.trainers import loop

    seen = {}
    orig = loop.Run.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        seen["before"] = [p.detach().clone() for p in self.params]
        seen["run"] = self

    loop.Run.__init__ = init
    try:
        train()
    finally:
        loop.Run.__init__ = orig
    run = seen["run"]
    assert len(run.params) > 0 and all(p.requires_grad for p in run.params)
    last = max((int(n.split(".")[1]) for n in run.param_names if n.startswith("transformer_blocks.")), default=None)
    dead = f"transformer_blocks.{last}.attn.add_q_proj." if last is not None else None  # SD3 only (Wan: blocks.)
    return run, [n for n, a, b in zip(run.param_names, seen["before"], run.params)
                 if torch.equal(a, b.detach()) and not (dead and n.startswith(dead))]
