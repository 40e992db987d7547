"""GPU speed paths compute the plain path's function: checked on CPU in float32.

FlexAttention and per-scale attention equal the dense block-causal mask; checkpointing
and the compiled blocks leave outputs and gradients unchanged; the static sampling
engine draws the plain sampler's tokens for a fixed generator. Every path is applied to a
built model from outside (varcore.fast.apply_plan) and leaves its parameters and state dict alone.
"""

import copy
import warnings

import pytest
import torch

import varcore.fast.flex as flex_mod
from varcore import ConfigError, SamplingConfig, VAR, VARConfig, sample_tokens
from varcore.fast.attention import FlexBlockCausal, ScaleSplitAttention
from varcore.fast.compile import compile_region
from varcore.fast.flex import flex_attention
from varcore.fast.kv_attention import KernelKVCache
from varcore.fast.plan import ExecutionPlan, apply_plan, reset_plan
from varcore.fast.static_sampler import EagerKVCache, release_static_engine, static_engine
from varcore.sample import Teacher
from varcore.scales import ScaleLayout, block_causal_mask
from varcore.var import AdaLNBlock, AdaLNHead, BlockCausalAttention
from tests.conftest import randomize_

PAPER = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _plan(cfg: VARConfig, **choices) -> ExecutionPlan:
    """A CPU training plan with ``choices`` (the rest plain)."""
    return ExecutionPlan(**{"attention": "dense", "mlp": "plain", "compile": False, **choices}).resolve(
        cfg, "cpu", training=True)


def _twin(cfg: VARConfig, **choices) -> tuple[VAR, VAR]:
    """A plain model and a copy with the same weights under the execution plan ``choices`` (eval mode)."""
    a = randomize_(VAR(cfg)).eval()
    b = apply_plan(copy.deepcopy(a), _plan(cfg, **choices))
    return a, b


def _grads(model: VAR, label, x) -> list[torch.Tensor]:
    model.zero_grad()
    model(label, x).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def cfg(tiny_vq_cfg) -> VARConfig:
    return VARConfig(depth=3, vocab_size=tiny_vq_cfg.vocab_size, Cvae=tiny_vq_cfg.Cvae,
                     patch_nums=tiny_vq_cfg.patch_nums, num_classes=5)


def _batch(cfg, B=3):
    return torch.tensor([0, 4, 5][:B]), torch.randn(B, cfg.L - cfg.first_l, cfg.Cvae)


def test_scale_ends_paper():
    lay = ScaleLayout(PAPER)
    assert lay.ends == (1, 5, 14, 30, 55, 91, 155, 255, 424, 680) and lay.starts[:3] == (0, 1, 5)


@pytest.mark.parametrize("impl", ["per_scale1", "per_scale7", "per_scale10", "flex"])
def test_attention_forms_equal_dense_mask(impl):
    if impl == "flex" and flex_attention is None:
        pytest.skip("no FlexAttention in this torch")
    q, k, v = (torch.randn(2, 2, 680, 16, requires_grad=True) for _ in range(3))   # paper scale: tiles straddle edges
    ref = BlockCausalAttention(PAPER)(q, k, v, 0.0, 1.0)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    if impl == "flex":
        core = FlexBlockCausal(PAPER, "cpu")
        q, k, v = q.detach(), k.detach(), v.detach()        # FlexAttention has no CPU backward
    else:  # the first n scales in one masked call, every later scale unmasked against its prefix
        n = int(impl[len("per_scale"):])
        core = ScaleSplitAttention(PAPER, n, ("math",))
        assert core.prefix_mask_PP.shape[0] == ScaleLayout(PAPER).ends[n - 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # flex outside torch.compile warns
        out = core(q, k, v, 0.0, 1.0)
    assert (out - ref).norm() / ref.norm() < 1e-5
    if impl != "flex":
        for g0, g in zip(g_ref, torch.autograd.grad(out.square().sum(), (q, k, v))):
            assert (g - g0).norm() / g0.norm() < 1e-5


def test_scale_split_fa4_plumbing(monkeypatch):
    """The FlashAttention-4 path hands the kernel (B, L, H, hd) tensors and the softmax scale
    and gets the block-causal result back (a stand-in kernel; the real one needs a GPU)."""
    import sys
    import types

    calls = []

    def flash_attn_func(q_BlHc, k_BLHc, v_BLHc, softmax_scale=None):
        calls.append((q_BlHc.shape, k_BLHc.shape, softmax_scale))
        o = torch.nn.functional.scaled_dot_product_attention(
            q_BlHc.transpose(1, 2), k_BLHc.transpose(1, 2), v_BLHc.transpose(1, 2), scale=softmax_scale)
        return o.transpose(1, 2), None                       # (out, lse) like flash-attn-4
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    pn = (1, 2, 3, 4)
    q, k, v = (torch.randn(2, 30, 3, 8).transpose(1, 2) for _ in range(3))   # (B, H, L, hd) views
    ref = BlockCausalAttention(pn)(q, k, v, 0.0, 0.7)
    out = ScaleSplitAttention(pn, 2, ("fa4",))(q, k, v, 0.0, 0.7)
    assert calls == [(torch.Size([2, 9, 3, 8]), torch.Size([2, 14, 3, 8]), 0.7),
                     (torch.Size([2, 16, 3, 8]), torch.Size([2, 30, 3, 8]), 0.7)]
    assert (out - ref).norm() / ref.norm() < 1e-5
    assert out.transpose(1, 2).is_contiguous()               # (B, L, H, hd) storage for the projection


def test_fa4_missing_names_the_package(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ImportError, match="flash-attn-4"):
        ScaleSplitAttention((1, 2), 1, ("fa4",))(q, q, q, 0.0, 1.0)


def test_scale_split_plan_checks():
    cfg = VARConfig(depth=2, patch_nums=(1, 2, 4))
    with pytest.raises(ConfigError) as e:
        ExecutionPlan(attention="per_scale", attn_prefix_scales=4).resolve(cfg, "cpu", training=True)
    assert e.value.field == "attn_prefix_scales"
    with pytest.raises(ConfigError) as e:
        ExecutionPlan(attn_backends=("fa3",))
    assert e.value.field == "attn_backends"
    with pytest.raises(ConfigError) as e:                    # fa4 alone
        ExecutionPlan(attn_backends=("fa4", "math"))
    assert e.value.field == "attn_backends"
    with pytest.raises(ConfigError) as e:                    # and without attention dropout
        ExecutionPlan(attn_backends=("fa4",)).resolve(VARConfig(depth=2, attn_drop_rate=0.1), "cpu", training=True)
    assert e.value.field == "attn_backends"
    m = VAR(VARConfig(depth=1, patch_nums=(1, 2, 4), Cvae=4, vocab_size=8, num_classes=2))
    apply_plan(m, _plan(m.cfg, attention="per_scale", attn_prefix_scales=2, attn_backends=["math"]))
    split = m.blocks[0].attn.core
    assert isinstance(split, ScaleSplitAttention) and split.prefix_mask_PP.shape == (5, 5) and split.ends == (21,)


@pytest.mark.parametrize("impl", ["per_scale", "flex"])
def test_model_attention_kernels_same_logits_and_grads(cfg, impl):
    if impl == "flex" and flex_attention is None:
        pytest.skip("no FlexAttention in this torch")
    dense, fast = _twin(cfg, attention=impl)
    assert fast.execution_plan.attention == impl
    assert dense.state_dict().keys() == fast.state_dict().keys()   # a plan never changes the checkpoint
    label, x = _batch(cfg)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ref, out = dense(label, x), fast(label, x)
    assert (out - ref).norm() / ref.norm() < 1e-5
    if impl == "per_scale":                                   # FlexAttention has no CPU backward
        for g_ref, g in zip(_grads(dense, label, x), _grads(fast, label, x)):
            assert (g - g_ref).norm() <= 1e-4 * g_ref.norm() + 1e-12


def test_auto_is_plain_on_cpu_and_fast_on_cuda(tiny_var_cfg):
    plan = ExecutionPlan().resolve(tiny_var_cfg, "cpu", training=True, amp=torch.bfloat16)
    assert (plan.attention, plan.mlp, plan.compile, plan.cuda_graph, plan.master_weights) == (
        "dense", "plain", False, False, False)
    cuda = ExecutionPlan(mlp="plain").resolve(tiny_var_cfg, "cuda", training=True, amp=torch.bfloat16)
    assert cuda.compile and cuda.cuda_graph and cuda.master_weights
    assert cuda.attention == ("flex" if flex_attention is not None else "per_scale")
    ddp = ExecutionPlan().resolve(tiny_var_cfg, "cuda", training=True, amp=torch.bfloat16, world=2)
    assert not ddp.cuda_graph and not ddp.master_weights
    assert not ExecutionPlan().resolve(tiny_var_cfg, "cuda", training=True, amp=None).master_weights
    assert ExecutionPlan(compile=False).resolve(tiny_var_cfg, "cuda", training=True).attention == "per_scale"
    assert SamplingConfig().engine == "auto"


def test_reset_restores_the_plain_model(cfg):
    plain, fast = _twin(cfg, attention="per_scale", mlp="fused", checkpointing=2)
    reset_plan(fast)
    assert all(isinstance(b.attn.core, BlockCausalAttention) and type(b.ffn).__name__ == "FFN" and
               "forward" not in b.__dict__ for b in fast.blocks)
    label, x = _batch(cfg)
    with torch.no_grad():
        assert torch.equal(fast(label, x), plain(label, x))


def test_checkpointing_same_gradients(cfg):
    cfg = VARConfig(**{**cfg.__dict__, "drop_path_rate": 0.3})
    plain, ckpt = _twin(cfg, checkpointing=True)
    assert ckpt.execution_plan.checkpointing == cfg.depth
    label, x = _batch(cfg)
    plain.train(), ckpt.train()
    torch.manual_seed(5)
    g_ref = _grads(plain, label, x)
    torch.manual_seed(5)                                      # same class/drop-path draws
    g = _grads(ckpt, label, x)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g_ref, g))


def test_compiled_blocks_share_one_graph(cfg, aot_eager):
    """Every block goes through one traced graph (drop-path rates are tensors, not constants)."""
    cfg = VARConfig(**{**cfg.__dict__, "drop_path_rate": 0.2, "cond_drop_rate": 0.0})
    plain, comp = _twin(cfg, compile=True, attention="per_scale")
    label, x = _batch(cfg)
    assert torch.allclose(comp(label, x), plain(label, x), rtol=1e-5, atol=1e-6)
    comp.train()
    comp(label, x).sum().backward()
    # one block graph per mode (eval, train) and the head; one graph per block would make >= 7
    assert aot_eager["stats"]["unique_graphs"] <= 4


def test_compiled_region_keeps_compiling_past_dynamo_default_limit(aot_eager):
    """Many widths/batch sizes through one region (several depths sampled in one process)
    each get a graph instead of falling back to eager after dynamo's default 8."""
    head_fn = compile_region(AdaLNHead.forward)
    for C in range(8, 8 + 4 * 12, 4):                       # 12 widths > torch's default limit of 8
        head = AdaLNHead(C, 5, 1e-6)
        x, cond = torch.randn(2, 3, C), torch.randn(2, C)
        assert torch.allclose(head_fn(head, x, cond), head(x, cond), atol=1e-6)
    assert aot_eager["stats"]["unique_graphs"] == 12
    assert torch._dynamo.config.recompile_limit == 8         # the raised limit is scoped to the calls


def test_plan_checks_name_the_field():
    with pytest.raises(ConfigError) as e:
        ExecutionPlan(attention="flash")
    assert e.value.field == "attention"
    with pytest.raises(ConfigError) as e:
        ExecutionPlan(checkpointing=3).resolve(VARConfig(depth=2), "cpu", training=True)
    assert e.value.field == "checkpointing"
    with pytest.raises(ConfigError) as e:
        ExecutionPlan(attention="flex").resolve(VARConfig(depth=2, attn_drop_rate=0.1), "cpu", training=True)
    assert e.value.field == "attention"
    for key in ("cuda_graph", "master_weights"):
        with pytest.raises(ConfigError, match="true needs") as e:
            ExecutionPlan(**{key: True}).resolve(VARConfig(depth=2), "cuda", training=True, amp=torch.bfloat16,
                                                 world=2)
        assert e.value.field == key
        with pytest.raises(ConfigError) as e:
            ExecutionPlan(**{key: "yes"})
        assert e.value.field == key
    with pytest.raises(ConfigError, match="resolve the plan first"):
        apply_plan(VAR(VARConfig(depth=1, patch_nums=(1, 2), vocab_size=8, Cvae=4)), ExecutionPlan())
    with pytest.raises(ConfigError) as e:
        SamplingConfig(engine="fast")
    assert e.value.field == "engine"


# ---- static sampling engine ------------------------------------------------------------
def _sample(var, vq, label, engine, seed, **kw):
    s = SamplingConfig(cfg=1.5, top_k=20, top_p=0.9, engine=engine)
    return sample_tokens(var, vq.quantizer, label, s, torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("amp", [False, True])
def test_static_engine_same_tokens_as_plain(tiny_var, tiny_vqvae, amp):
    label = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        plain, f_plain = _sample(tiny_var, tiny_vqvae, label, "plain", 11)
        static, f_static = _sample(tiny_var, tiny_vqvae, label, "static", 11)
        again, _ = _sample(tiny_var, tiny_vqvae, label, "static", 11)   # reuses the cached engine
        eng = static_engine(tiny_var, 2 * len(label), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(plain, static))
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    assert torch.equal(f_plain, f_static)
    lin_dtype = eng.model.blocks[0].attn.qkv.weight.dtype
    assert lin_dtype == (torch.bfloat16 if amp else torch.float32)
    assert eng.model.pos_1LC.dtype == torch.float32            # only what autocast casts is rounded
    release_static_engine(tiny_var)


def test_static_engine_projects_the_class_once_per_batch(tiny_var, tiny_vqvae):
    """The AdaLN projections run once per batch (not once per scale), and a second batch of other
    classes through the same engine still draws the plain loop's tokens."""
    from varcore.fast.static_sampler import BatchModulation
    eng = static_engine(tiny_var, 4, torch.device("cpu"))
    mods = [b.ada_lin for b in eng.model.blocks] + [eng.model.head.ada_lin]
    assert all(isinstance(m, BatchModulation) for m in mods)
    calls = []
    hooks = [m.inner.register_forward_hook(lambda *a: calls.append(1)) for m in mods]
    for label in (torch.tensor([0, 1]), torch.tensor([3, 2])):
        plain, _ = _sample(tiny_var, tiny_vqvae, label, "plain", 4)
        static, _ = _sample(tiny_var, tiny_vqvae, label, "static", 4)
        assert all(torch.equal(a, b) for a, b in zip(plain, static))
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * len(mods)          # K = 4 scales per batch, one projection each
    release_static_engine(tiny_var)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kv_cache_rows_copy_bit_exactly(dtype):
    """The engine's KV-cache appends move 8-byte words: the same bits as copy_, into a slice of
    the (B, L, H, hd) cache from a (B, l, H, hd) view with a strided batch (v out of qkv), and a
    plain copy where words cannot express the layout (odd last dimension)."""
    from varcore.fast.static_sampler import copy_rows_
    qkv = torch.randn(3, 5, 3, 4, 8).to(dtype)            # (B, l, 3, H, hd), as the projection writes it
    v = qkv.unbind(2)[2]
    cache = torch.zeros(3, 12, 4, 8, dtype=dtype)
    copy_rows_(cache[:, 4:9], v)
    assert torch.equal(cache[:, 4:9], v) and not cache[:, :4].any() and not cache[:, 9:].any()
    odd, src = torch.zeros(2, 6, 3, dtype=dtype), torch.randn(2, 2, 3).to(dtype)
    copy_rows_(odd[:, 1:3], src)
    assert torch.equal(odd[:, 1:3], src)


def test_compiled_engine_runs_the_fused_ffn(tiny_var, aot_eager):
    """The compiled engine's blocks carry the fused FFN (GELU in the matmul epilogue on CUDA; the
    plain FFN's ops on the CPU, so its logits equal the plain loop's); the exact engine keeps the
    plain FFN."""
    from varcore.fast.fused_mlp import FusedFFN
    from varcore.fast.static_sampler import StaticScales
    label = torch.tensor([0, 3])
    compiled = StaticScales(tiny_var, 2, torch.device("cpu"), None, graphs=False, compiled=True)
    exact = StaticScales(tiny_var, 2, torch.device("cpu"), None, graphs=False, compiled=False)
    assert all(isinstance(b.ffn, FusedFFN) for b in compiled.model.blocks)
    assert not any(isinstance(b.ffn, FusedFFN) for b in exact.model.blocks)
    # the compiled engine traces its caches (allocated up front; attention through the Triton
    # kernel on CUDA, SDPA here); the exact one copies words eagerly
    cfg = tiny_var.cfg
    assert all(type(c) is KernelKVCache and c.k_BLHc.shape == (2, cfg.L, cfg.H, cfg.C // cfg.H)
               for c in compiled.caches)
    assert all(isinstance(c, EagerKVCache) for c in exact.caches)
    cond = tiny_var.cond(label)
    with torch.no_grad():
        caches, x = tiny_var.new_kv_caches(), tiny_var.sos(cond)
        ref = tiny_var.forward_scale(x, cond, 0, caches)
        compiled.begin(tiny_var, cond)
        assert torch.allclose(compiled.scale(0, x), ref, rtol=1e-5, atol=1e-6)


def test_static_engine_follows_weight_updates(tiny_var, tiny_vqvae):
    label = torch.tensor([0, 1])
    _sample(tiny_var, tiny_vqvae, label, "static", 3)
    with torch.no_grad():
        for p in tiny_var.parameters():
            p.mul_(1.5)                                      # an in-place optimiser step
    plain, _ = _sample(tiny_var, tiny_vqvae, label, "plain", 3)
    static, _ = _sample(tiny_var, tiny_vqvae, label, "static", 3)
    assert all(torch.equal(a, b) for a, b in zip(plain, static))
    release_static_engine(tiny_var)


def test_static_engine_follows_replaced_parameters(tiny_var, tiny_vqvae):
    """Parameters replaced by new objects (``load_state_dict(assign=True)``) reach the engine's
    copy too: its weight check covers identity and storage, not only in-place versions."""
    from varcore.fast.static_sampler import weight_state
    label = torch.tensor([2, 4])
    _sample(tiny_var, tiny_vqvae, label, "static", 3)
    before = weight_state(tiny_var)
    sd = {k: v * 0.5 if v.is_floating_point() else v for k, v in tiny_var.state_dict().items()}
    tiny_var.load_state_dict(sd, assign=True)
    assert weight_state(tiny_var) != before
    plain, _ = _sample(tiny_var, tiny_vqvae, label, "plain", 3)
    static, _ = _sample(tiny_var, tiny_vqvae, label, "static", 3)
    assert all(torch.equal(a, b) for a, b in zip(plain, static))
    release_static_engine(tiny_var)


def test_static_engine_with_teacher(tiny_var, tiny_vqvae):
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = tiny_vqvae.img_to_idx(img)
    keep = [torch.rand(i.shape) < 0.5 for i in idx]
    label = torch.tensor([3, 4])
    plain, _ = _sample(tiny_var, tiny_vqvae, label, "plain", 9, teacher=Teacher(idx, keep))
    static, _ = _sample(tiny_var, tiny_vqvae, label, "static", 9, teacher=Teacher(idx, keep))
    assert all(torch.equal(a, b) for a, b in zip(plain, static))
    release_static_engine(tiny_var)


def test_static_engine_of_a_planned_model_samples_the_plain_path(tiny_var, tiny_vqvae):
    """A model planned for training (checkpointed blocks, fused FFN, another attention kernel)
    samples the same tokens: the engine's copy drops the plan, the plain loop never uses it."""
    label = torch.tensor([0, 1, 2])
    plain, _ = _sample(tiny_var, tiny_vqvae, label, "plain", 5)
    apply_plan(tiny_var, _plan(tiny_var.cfg, attention="per_scale", mlp="fused", checkpointing=1))
    static, _ = _sample(tiny_var, tiny_vqvae, label, "static_exact", 5)
    again, _ = _sample(tiny_var, tiny_vqvae, label, "plain", 5)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(plain, static, again))
    release_static_engine(tiny_var)


def test_compiled_sampling_blocks_equal_eager(tiny_var, tiny_var_cfg, aot_eager):
    """The compiled engine keeps the math: its blocks (each starting with the previous block's
    deferred residual add, with the KV-cache appends and the attention inside the graph, the
    cache preallocated and its position a dynamic integer) give the eager loop's logits and
    every cached key and value. The graphs serve every block and scale: per compiled function
    one static graph (scale 1), one dynamic (the middle scales) and, for the block, one where the
    last scale fills the cache; not one per block or scale (block 1's zero branch is laid out as
    the others' branches, so it needs no graph of its own)."""
    from varcore.fast.static_sampler import StaticScales
    cfg = tiny_var_cfg
    eng = StaticScales(tiny_var, 3, torch.device("cpu"), None, graphs=False, compiled=True)
    assert aot_eager["stats"]["unique_graphs"] == 0   # nothing compiled before the first scale
    cond = tiny_var.cond(torch.tensor([0, 3, 5]))
    x = torch.randn(3, cfg.L - cfg.first_l, cfg.Cvae)
    outs = {}
    with torch.no_grad():
        eng.begin(tiny_var, cond)
        caches, x_in, out, out_eng = tiny_var.new_kv_caches(), tiny_var.sos(cond), [], []
        for k, (start, end) in enumerate(zip(cfg.layout.starts, cfg.layout.ends)):
            out.append(tiny_var.forward_scale(x_in, cond, start, caches))
            out_eng.append(eng.scale(k, x_in).clone())
            if k + 1 < cfg.layout.K:
                x_in = tiny_var.word_embed(x[:, end - cfg.first_l:cfg.layout.ends[k + 1] - cfg.first_l])
        outs["eager"], outs["compiled"] = torch.cat(out, 1), torch.cat(out_eng, 1)
        kv = {name: torch.stack([torch.stack([c.k_BLHc, c.v_BLHc]) for c in cs])
              for name, cs in (("eager", caches), ("compiled", eng.caches))}
    assert all(c.len == cfg.L for c in (*caches, *eng.caches))
    assert not eng.zero_y.any() and not eng.zero_gamma_B1C.any()
    assert torch.allclose(outs["compiled"], outs["eager"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(kv["compiled"], kv["eager"], rtol=1e-5, atol=1e-6)
    assert aot_eager["stats"]["calls_captured"] > 0 and not aot_eager["graph_break"], dict(aot_eager["graph_break"])
    # block: static, dynamic, cache-filling last scale; head: static, dynamic
    assert 0 < aot_eager["stats"]["unique_graphs"] <= 5, aot_eager["stats"]["unique_graphs"]


def test_deferred_block_is_the_block_shifted_by_one_add(tiny_var):
    """Eager, the deferred blocks compute the plain loop bit for bit: the same operations in the
    same order, the last residual add of each block done at the start of the next."""
    from varcore.fast.static_sampler import deferred_block, deferred_head
    cfg = tiny_var.cfg
    cond = tiny_var.cond(torch.tensor([1, 2]))
    x = tiny_var.sos(cond) + tiny_var.scale_pos(0, cfg.first_l)
    with torch.no_grad():
        ref = tiny_var.forward_scale(tiny_var.sos(cond), cond, 0, tiny_var.new_kv_caches())
        y, g = torch.zeros_like(x), torch.zeros(2, 1, cfg.C)
        for block, cache in zip(tiny_var.blocks, tiny_var.new_kv_caches()):
            x, y, g = deferred_block(block, x, y, g, cond, cache)
        got = deferred_head(tiny_var.head, x, y, g, cond)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("n", [1, 2, 5, 13])
def test_bicubic_as_matmul_equals_interpolate(n):
    """The quantiser's CUDA upsampling (two matmuls) is F.interpolate's bicubic map, in fp32 under autocast."""
    import torch.nn.functional as F
    from varcore.fast.bicubic import upsample_bicubic
    z = torch.randn(3, 8, n, n)
    ref = F.interpolate(z, size=(16, 16), mode="bicubic")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upsample_bicubic(z, 16)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)


def _filter_two_passes(logits, top_k, top_p):
    """The two-pass filter (top-k pass, then a sort for top-p) that the one-sort filter replaces."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[..., -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (50, 0.96), (900, 0.96), (300, 1.0), (0, 1.0), (5, 0.5)])
def test_one_sort_filter_equals_two_passes(top_k, top_p):
    from varcore.sample import filter_logits
    logits = torch.randn(64, 1024) * 3
    assert torch.equal(filter_logits(logits, top_k, top_p), _filter_two_passes(logits, top_k, top_p))


def test_flex_kernel_options_only_tile_the_math():
    """The CUDA flex tiles are speed settings: no option that changes the arithmetic, and tiles
    that divide the block mask's tiles (flex rejects others)."""
    for key, value in flex_mod.FLEX_KERNEL_OPTIONS.items():
        if key == "BLOCKS_ARE_CONTIGUOUS":                  # a promise about the mask: next test
            continue
        name = key.split("_", 1)[1]
        assert name.startswith("BLOCK_") or name in ("num_warps", "num_stages"), key
        if name.startswith("BLOCK_"):
            assert flex_mod.FLEX_MASK_BLOCK % value == 0, key


def test_flex_mask_tiles_cut_computed_pairs():
    """At paper scale 64-token mask tiles compute 1.22x the pairs the mask allows, flex's
    default 128-token tiles 1.60x; the model's mask uses FLEX_MASK_BLOCK-token tiles."""
    pn = PAPER
    allowed = ScaleLayout(pn).attention_pairs()
    assert allowed == 286434
    assert flex_mod.computed_pairs(pn, 128) == 458752                   # 1.60x
    assert flex_mod.computed_pairs(pn, 64) == 348160                    # 1.22x
    assert flex_mod.computed_pairs(pn, 1) == allowed                    # one-token tiles: exact
    assert flex_mod.computed_pairs((1, 2), 8) == 8 * 8                  # one tile holds everything
    if flex_attention is None:
        pytest.skip("no FlexAttention in this torch")
    mask = flex_mod.flex_block_mask(pn, "cpu", 64)
    assert tuple(mask.BLOCK_SIZE) == (64, 64)
    dense_LL = block_causal_mask(pn)
    # a tile is skipped exactly when no query of it sees any key of it
    kv_num_Q = mask.kv_num_blocks[0, 0]
    for qb in range(kv_num_Q.numel()):
        rows = dense_LL[qb * 64:(qb + 1) * 64]
        last_seen = rows.any(0).nonzero().max().item()
        assert kv_num_Q[qb].item() + (mask.full_kv_num_blocks[0, 0, qb].item() if mask.full_kv_num_blocks is not None
                                      else 0) == last_seen // 64 + 1


@pytest.mark.parametrize("pn", [(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20), (1, 2, 4, 8),
                                (1, 3, 5)])
@pytest.mark.parametrize("block", [16, 64, 128])
def test_flex_tiles_cover_the_mask_in_contiguous_runs(pn, block):
    """The model's block mask (1) computes every allowed pair, (2) skips the mask only on
    tiles whose real query-key pairs are all allowed, and (3) lists each tile row's and
    column's partial and full tiles as runs of consecutive tiles, which flex's
    BLOCKS_ARE_CONTIGUOUS (set in FLEX_KERNEL_OPTIONS) assumes; flex's own create_block_mask
    breaks (3) at paper scale, where the last tile runs past token 680."""
    if flex_attention is None:
        pytest.skip("no FlexAttention in this torch")
    from torch.nn.attention.flex_attention import create_block_mask
    assert flex_mod.FLEX_KERNEL_OPTIONS.get("BLOCKS_ARE_CONTIGUOUS")
    dense_LL = block_causal_mask(pn)
    L = dense_LL.shape[0]
    mask = flex_mod.flex_block_mask(pn, "cpu", block)
    assert flex_mod.blocks_contiguous(mask)
    partial_QK, full_QK = flex_mod.tile_lists(dense_LL, block)
    assert not (partial_QK & full_QK).any()
    tile_L = torch.arange(L) // block
    seen_QK = torch.zeros_like(full_QK)
    seen_QK.index_put_((tile_L[:, None].expand(L, L)[dense_LL], tile_L[None, :].expand(L, L)[dense_LL]),
                       torch.tensor(True))
    assert torch.equal(seen_QK, partial_QK | full_QK)                     # (1) and no tile computed for nothing
    denied_QK = torch.zeros_like(full_QK)
    denied_QK.index_put_((tile_L[:, None].expand(L, L)[~dense_LL], tile_L[None, :].expand(L, L)[~dense_LL]),
                         torch.tensor(True))
    assert not (denied_QK & full_QK).any()                                # (2)
    n = full_QK.shape[0]
    kv_num = mask.kv_num_blocks[0, 0] + mask.full_kv_num_blocks[0, 0]
    assert torch.equal(kv_num, (partial_QK | full_QK).sum(1).int())
    if L % block:                                                         # (3) fails with flex's own mask
        s_L = ScaleLayout(pn).scale_ids()
        theirs = create_block_mask(lambda b, h, q, k: s_L[k] <= s_L[q], None, None, L, L, device="cpu",
                                   BLOCK_SIZE=block)
        assert n == theirs.kv_num_blocks.shape[-1]
        if n > 2 and pn[-1] >= 8:
            assert not flex_mod.blocks_contiguous(theirs)


@pytest.mark.parametrize("block", [64, 128])
def test_flex_mask_mod_past_the_end_sees_nothing(block):
    """A kernel may evaluate the mask on a tile running past token L without bounding the
    indices (FlashAttention-4's CuTe kernels): the mask reads scale ids padded to whole tiles,
    so every real query denies every padded key, and the real pairs are the block-causal mask."""
    if flex_attention is None:
        pytest.skip("no FlexAttention in this torch")
    pn = PAPER
    L = ScaleLayout(pn).L
    mask = flex_mod.flex_block_mask(pn, "cpu", block)
    n = -(-L // block) * block                               # 768 for both tiles
    q_N, k_N = torch.arange(n)[:, None], torch.arange(n)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    allowed_NN = mask.mask_mod(zero, zero, q_N, k_N)
    assert allowed_NN.shape == (n, n)
    assert torch.equal(allowed_NN[:L, :L], block_causal_mask(pn))
    assert not allowed_NN[:L, L:].any()


def test_flex_flash_needs_cuda_and_flash_attn(monkeypatch):
    """``flex_flash`` (flex through FlashAttention-4) fails at resolve, naming ``attention``,
    where it cannot run: off CUDA, uncompiled, or without the flash-attn-4 package; its core
    cuts the mask in the 128-token tiles FlashAttention-4's Hopper backward takes."""
    cfg = VARConfig(depth=2, patch_nums=(1, 2, 4))
    with pytest.raises(ConfigError, match="CUDA device") as e:
        ExecutionPlan(attention="flex_flash", compile=True).resolve(cfg, "cpu", training=True)
    assert e.value.field == "attention"
    with pytest.raises(ConfigError, match="torch.compile") as e:
        ExecutionPlan(attention="flex_flash", compile=False).resolve(cfg, "cuda", training=True)
    assert e.value.field == "attention"
    monkeypatch.setattr(flex_mod, "flash_available", lambda: False)
    with pytest.raises(ConfigError, match="flash-attn-4") as e:
        ExecutionPlan(attention="flex_flash").resolve(cfg, "cuda", training=True)
    assert e.value.field == "attention"
    with pytest.raises(ConfigError) as e:
        FlexBlockCausal(PAPER, "cpu", "cute")
    assert e.value.field == "backend"
    monkeypatch.setattr(flex_mod, "flash_available", lambda: True)
    with pytest.raises(ConfigError, match="no attention dropout") as e:   # runnable, but not with dropout
        ExecutionPlan(attention="flex_flash").resolve(VARConfig(depth=2, attn_drop_rate=0.1), "cuda", training=True)
    assert e.value.field == "attention"
    if flex_attention is None:
        return
    monkeypatch.setattr(flex_mod, "flex_block_mask", lambda pn, device, block: (pn, device, block))   # no GPU here
    core = FlexBlockCausal(PAPER, "cuda", "flash")
    assert core.kernel_options == {"BACKEND": "FLASH"} and core.block_mask == (PAPER, "cuda", 128)


def test_blocks_contiguous_detects_gaps():
    if flex_attention is None:
        pytest.skip("no FlexAttention in this torch")
    from torch.nn.attention.flex_attention import create_block_mask
    holes = create_block_mask(lambda b, h, q, k: (k % 256) < 64, None, None, 512, 512, device="cpu", BLOCK_SIZE=64)
    assert not flex_mod.blocks_contiguous(holes)


class _BaseChoices:
    def get_flex_attention_bwd_configs(self, head_dim, dtype, device_type="cuda"):
        from dataclasses import dataclass

        @dataclass
        class Conf:
            block_m1: int = 64
            block_n1: int = 128
            block_m2: int = 128
            block_n2: int = 64
            num_stages: int = 3
            num_warps: int = 8
        return [Conf()]


def test_flex_choices_use_the_pinned_backward_tiles(monkeypatch):
    """Inductor's flex backward check must see the tiles FLEX_KERNEL_OPTIONS pins, not its
    128-wide defaults (which reject a 64-token mask); other devices and unpinned options
    keep inductor's list."""
    Choices = type("C", (flex_mod._TiledChoices, _BaseChoices), {})
    (conf,) = Choices().get_flex_attention_bwd_configs(64, torch.bfloat16, "cuda")
    opts = flex_mod.FLEX_KERNEL_OPTIONS
    assert (conf.block_m1, conf.block_n1, conf.block_m2, conf.block_n2, conf.num_warps, conf.num_stages) == (
        opts["bwd_BLOCK_M1"], opts["bwd_BLOCK_N1"], opts["bwd_BLOCK_M2"], opts["bwd_BLOCK_N2"],
        opts["bwd_num_warps"], opts["bwd_num_stages"])
    assert all(flex_mod.FLEX_MASK_BLOCK % b == 0 for b in (conf.block_m1, conf.block_n1, conf.block_m2, conf.block_n2))
    (cpu_conf,) = Choices().get_flex_attention_bwd_configs(64, torch.bfloat16, "cpu")
    assert cpu_conf.block_n1 == 128
    monkeypatch.setattr(flex_mod, "FLEX_KERNEL_OPTIONS", {})
    (default,) = Choices().get_flex_attention_bwd_configs(64, torch.bfloat16, "cuda")
    assert default.block_n1 == 128


def test_compiled_regions_carry_the_flex_choices(monkeypatch):
    """Every region compiled under inductor gets the choices handler (the backward of a
    64-token mask is compiled lazily, in autograd's thread, from these options)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    compile_region.cache_clear()
    try:
        compile_region(AdaLNHead.forward, tuned=True)
        compile_region(AdaLNBlock.forward)
        compile_region(AdaLNBlock.forward, graphs=True)    # the decoder's form: CUDA graphs per shape
    finally:
        compile_region.cache_clear()
    expected = flex_mod.compile_options()
    for kw in seen:
        assert kw["backend"] == "inductor"
        assert {k: kw["options"][k] for k in expected} == expected
    assert seen[0]["options"]["coordinate_descent_tuning"] is True
    assert [kw["options"].get("triton.cudagraphs", False) for kw in seen] == [False, False, True]
    if expected:
        assert isinstance(expected["inductor_choices_class"](), flex_mod._TiledChoices)


def _block_input_dtypes(model: VAR, label, x) -> list[torch.dtype]:
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype)) for b in model.blocks]
    try:
        logits = model(label, x)
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def test_residual_stream_in_the_autocast_dtype_as_the_official_code(cfg):
    """Under bf16 autocast the blocks get a bf16 residual stream (the official code casts it
    to the autocast dtype before the blocks); residual_dtype="float32" keeps float32, and
    without autocast both settings are the same float32 computation."""
    a = randomize_(VAR(cfg)).eval()
    b = VAR(VARConfig(**{**cfg.__dict__, "residual_dtype": "float32"})).eval()
    b.load_state_dict(a.state_dict())
    assert a.cfg.residual_dtype == "autocast"
    label, x = _batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen_a, logits_a = _block_input_dtypes(a, label, x)
        seen_b, logits_b = _block_input_dtypes(b, label, x)
    assert seen_a == [torch.bfloat16] * cfg.depth
    assert seen_b == [torch.float32] * cfg.depth
    rel = ((logits_a.float() - logits_b.float()).norm() / logits_b.float().norm()).item()
    assert 0 < rel < 3e-2                                   # bf16 rounding of the stream, nothing more
    seen_a, logits_a = _block_input_dtypes(a, label, x)
    seen_b, logits_b = _block_input_dtypes(b, label, x)
    assert seen_a == seen_b == [torch.float32] * cfg.depth
    assert torch.equal(logits_a, logits_b)
    with pytest.raises(ConfigError, match="residual_dtype"):
        VARConfig(depth=2, residual_dtype="bf16")


def test_cudnn_autotune_restores_flag():
    import varcore.sample as sample_mod
    before = torch.backends.cudnn.benchmark
    with sample_mod.cudnn_autotune():
        assert torch.backends.cudnn.benchmark == (before or sample_mod.CUDNN_AUTOTUNE)
    assert torch.backends.cudnn.benchmark == before


def test_static_engine_frees_the_old_engine_before_building_a_new_one(tiny_var, monkeypatch):
    """A new batch size replaces the model's engine; the old one (its KV caches, weight copy and
    graphs) is gone before the new one allocates, so both are never held at once."""
    import weakref

    import varcore.fast.static_sampler as ss
    old = static_engine(tiny_var, 4, torch.device("cpu"))
    old_ref, alive_at_build = weakref.ref(old), []
    del old
    real_init = ss.StaticScales.__init__

    def init(self, *args, **kwargs):
        alive_at_build.append(old_ref() is not None)
        real_init(self, *args, **kwargs)
    monkeypatch.setattr(ss.StaticScales, "__init__", init)
    new = static_engine(tiny_var, 2, torch.device("cpu"))
    assert alive_at_build == [False] and new.key[0] == 2
    release_static_engine(tiny_var)


@pytest.mark.parametrize("fail_at", [None, 3])
def test_engine_captures_with_a_cublas_workspace_of_their_own(tiny_var, capture_log, fail_at):
    """The engine's captures are bracketed by dropping torch's cached cuBLAS workspaces: before the
    first (the graphs' workspace is then allocated in their own pool) and after the last, also when
    a capture fails (no later capture on torch's shared capture stream is handed this engine's
    memory; round 25's illegal memory access when batch 1 followed batch 64)."""
    import varcore.fast.static_sampler as ss
    eng = ss.StaticScales(tiny_var, 2, torch.device("cpu"), None, graphs=False)
    log = capture_log(fail_at)
    K = len(tiny_var.cfg.patch_nums)
    if fail_at is None:
        eng._capture()
        assert log == ["fresh"] + ["capture", "end"] * (1 + K) + ["fresh"]   # the modulation graph, then one a scale
    else:
        with pytest.raises(RuntimeError, match="capture failed"):
            eng._capture()
        assert log == ["fresh"] + ["capture", "end"] * (fail_at - 1) + ["fresh"]


def test_fresh_cublas_workspaces_is_a_no_op_without_cuda():
    """On a machine where CUDA was never initialised there is nothing to drop, and nothing fails."""
    import varcore.fast.graphs as graphs
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    graphs.fresh_cublas_workspaces()
