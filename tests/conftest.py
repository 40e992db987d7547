import pytest
import torch

import varcore.fast.compile as compile_mod
from varcore import VAR, VARConfig, VQVAE, VQVAEConfig
from varcore.fast.compile import compile_region


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Replace every parameter with noise so that no block is near the identity (the init
    makes AdaLN gates ~0, which would make mask and cache tests pass trivially)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_vq_cfg() -> VQVAEConfig:
    return VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, Cvae=8,
                       vocab_size=64, patch_nums=(1, 2, 3, 4))


@pytest.fixture
def tiny_vqvae(tiny_vq_cfg) -> VQVAE:
    return VQVAE(tiny_vq_cfg).eval()


@pytest.fixture
def tiny_var_cfg(tiny_vq_cfg) -> VARConfig:
    return VARConfig(depth=2, vocab_size=tiny_vq_cfg.vocab_size, Cvae=tiny_vq_cfg.Cvae,
                     patch_nums=tiny_vq_cfg.patch_nums, num_classes=5)


@pytest.fixture
def tiny_var(tiny_var_cfg) -> VAR:
    return randomize_(VAR(tiny_var_cfg)).eval()


@pytest.fixture
def aot_eager(monkeypatch):
    """Compiled regions through dynamo's aot_eager backend (same graphs, no code generation)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(compile_mod, "COMPILE_BACKEND", "aot_eager")
    compile_region.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    yield counters
    compile_region.cache_clear()
    torch._dynamo.reset()


@pytest.fixture
def capture_log(monkeypatch):
    """CPU stand-ins for the torch.cuda calls around a CUDA graph capture and for
    ``varcore.fast.graphs.fresh_cublas_workspaces``. ``capture_log(fail_at=None)`` installs them and
    returns the log they write in order: "fresh" per workspace drop, "capture" and "end" around each
    capture (capture number ``fail_at`` raises instead)."""
    import contextlib

    import varcore.fast.graphs as graphs

    def install(fail_at: int | None = None) -> list:
        log, captures = [], [0]

        class Stream:
            def __init__(self, *a, **k):
                pass

            def wait_stream(self, other):
                pass

        @contextlib.contextmanager
        def graph(g, pool=None):
            captures[0] += 1
            if captures[0] == fail_at:
                raise RuntimeError("capture failed")
            log.append("capture")
            yield
            log.append("end")

        monkeypatch.setattr(graphs, "fresh_cublas_workspaces", lambda: log.append("fresh"))
        for name, value in (("Stream", Stream), ("stream", lambda s: contextlib.nullcontext()),
                            ("current_stream", lambda *a: Stream()), ("graph_pool_handle", lambda: None),
                            ("CUDAGraph", object), ("graph", graph), ("synchronize", lambda *a: None),
                            ("empty_cache", lambda: None)):
            monkeypatch.setattr(torch.cuda, name, value)
        return log
    return install
