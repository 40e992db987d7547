"""Static-shape engine for scale-by-scale sampling: one CUDA graph per scale.

Sampling runs the same K transformer calls with the same shapes for every batch, so
each scale's forward (all blocks, KV-cache writes, head, float logits) is captured once
as a CUDA graph over preallocated buffers and then replayed: no Python or kernel-launch
overhead per layer. The graphs read a private copy of the model whose linear layers
hold their weights in the autocast dtype, so the fp32 -> bf16 weight casts that
autocast would redo at every scale happen once, and only when the weights changed.
The AdaLN projections of the class embeddings run once per batch (:class:`BatchModulation`,
one more graph), not once per scale. On CUDA the blocks and the head are also compiled
(fused element-wise work; graphs with a dynamic token count, so a few per model rather than
one per scale) and the FFN's GELU runs in its first matmul's epilogue
(:class:`varcore.fast.fused_mlp.FusedFFN`). A compiled block is one graph with its KV-cache
appends and its attention inside: the cache is preallocated and its position is a (dynamic)
integer, so inductor writes the normalised keys and the values into their slots from the
kernels that make them, instead of two copies per block and scale, and the attention over the
cache is a Triton kernel (:mod:`varcore.fast.kv_attention`). Each compiled block also
starts with the previous block's last residual add (:func:`deferred_block`), and each residual
add runs with the LayerNorm + AdaLN modulation after it as one Triton kernel
(:mod:`varcore.fast.add_norm`).

Without compilation the arithmetic is the plain path's: same modules, same kernels,
weights rounded to the same dtype, so a fixed generator gives the same tokens (on CPU,
where there are no graphs, the same engine runs eagerly and tests compare it with the
plain sampler). Compiled, the fused kernels round differently in the last bits.
"""

from __future__ import annotations

import contextlib
import copy
import weakref

import torch
import torch.nn as nn

from ..var import VAR, AdaLNBlock, AdaLNHead, KVCache
from .add_norm import add_ln_modulate
from .compile import compile_region
from .fused_mlp import FusedFFN
from .graphs import own_cublas_workspace
from .kv_attention import KernelKVCache
from .plan import reset_plan

_ENGINES: "weakref.WeakKeyDictionary[VAR, StaticScales]" = weakref.WeakKeyDictionary()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The ambient autocast dtype on ``device``'s type, or None when autocast is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def copy_rows_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for same-dtype tensors whose last dimension is contiguous, moved as
    8-byte words where the layout allows: a bit-exact copy that torch's strided copy kernel
    (one 2-byte element per index computation) runs at a fraction of the memory bandwidth.
    Appending one scale's bf16 keys and values to the KV caches of every block moved 25 GB per
    batch of 64 at d24, in 17 ms (r10-1)."""
    word = 8 // src.element_size() if src.dtype == dst.dtype and src.element_size() < 8 else 1
    if word > 1 and src.shape[-1] % word == 0:
        try:
            dst.view(torch.int64).copy_(src.view(torch.int64))
            return
        except RuntimeError:   # a stride or offset that 8-byte words cannot express
            pass
    dst.copy_(src)


def _collect_parameters(module: nn.Module, out: list) -> list:
    out.extend(module._parameters.values())
    for child in module._modules.values():
        if child is not None:
            _collect_parameters(child, out)
    return out


def weight_state(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """``(data_ptr, version)`` of every parameter of ``module`` (a shared one once per owner):
    changes when a parameter is updated in place, moved or replaced. Walks ``_modules`` directly:
    ``parameters()`` builds every submodule's dotted name, 1.15 ms at d30 (370 tensors) on a
    2-core EPYC against 0.31 ms here, and the check runs on the host before every batch's first
    kernel, while the GPU waits."""
    return tuple([(p.data_ptr(), p._version) for p in _collect_parameters(module, []) if p is not None])


class EagerKVCache(KVCache):
    """The uncompiled engine's KV cache: appends copy 8-byte words (:func:`copy_rows_`), the same
    bits as the plain cache's copy. Kept out of ``torch.compile`` graphs (a graph break at
    :meth:`attend`); the compiled engine uses the traceable
    :class:`varcore.fast.kv_attention.KernelKVCache` instead."""

    @torch.compiler.disable
    def attend(self, q_BHlc, k_BHlc, v_BHlc, scale: float | None) -> torch.Tensor:
        return super().attend(q_BHlc, k_BHlc, v_BHlc, scale)

    @staticmethod
    def write(dst_BlHc: torch.Tensor, src_BlHc: torch.Tensor) -> None:
        copy_rows_(dst_BlHc, src_BlHc)


class BatchModulation(nn.Module):
    """Stands in for an ``ada_lin`` (a block's or the head's AdaLN projection) in the engine's
    model copy: returns its output for the batch's class embeddings, computed once per batch by
    :meth:`refresh` instead of at every scale. The class does not change between scales, so the
    values are the same; each scale no longer re-reads the projection's weights (a third of a
    block's, 1.3 GB per scale at d30). At batch 1, where reading weights and launching kernels
    set the time, d30 went from 37.1 to 31.7 ms per image on an H200 with the decoder's graphs."""

    def __init__(self, ada_lin: nn.Module):
        super().__init__()
        self.inner = ada_lin
        self.register_buffer("out_BD", None, persistent=False)   # allocated by the first refresh

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.out_BD

    def refresh(self, cond_BD: torch.Tensor) -> None:
        out_BD = self.inner(cond_BD)
        if self.out_BD is None:
            self.out_BD = out_BD
        else:   # in place: captured graphs read this buffer
            self.out_BD.copy_(out_BD)


def deferred_block(block: AdaLNBlock, x_BlC: torch.Tensor, y_BlC: torch.Tensor, gamma_B1C: torch.Tensor,
                   cond_BD: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block`` at inference, shifted by one residual add: takes the stream before the previous
    block's last add, with that block's FFN branch ``y`` and gate, and returns its own the same
    way (``x + y * gamma`` is what the block's forward adds last). The same operations in the same
    order as :meth:`AdaLNBlock.forward` in eval mode (drop-path off). Each residual add and the
    LayerNorm + modulation after it are one pass over the float32 stream instead of an add that
    writes the stream and a LayerNorm that reads it back: on CUDA the Triton kernel of
    :func:`varcore.fast.add_norm.add_ln_modulate` (its ``h`` already in the next matmul's weight
    dtype, which is what autocast casts to), elsewhere the eager composition."""
    gamma1, gamma2, scale1, scale2, shift1, shift2 = block.modulation(cond_BD)
    x_BlC, h_BlC = add_ln_modulate(x_BlC, y_BlC, gamma_B1C, block.ln, scale1, shift1, block.attn.qkv.weight.dtype)
    x_BlC, h_BlC = add_ln_modulate(x_BlC, block.attn(h_BlC, cache), gamma1, block.ln, scale2, shift2,
                                   block.ffn.fc1.weight.dtype)
    return x_BlC, block.ffn(h_BlC), gamma2


def deferred_head(head: AdaLNHead, x_BlC: torch.Tensor, y_BlC: torch.Tensor, gamma_B1C: torch.Tensor,
                  cond_BC: torch.Tensor) -> torch.Tensor:
    """The head after the last block's deferred residual add (:func:`deferred_block`)."""
    return head(x_BlC + y_BlC.mul(gamma_B1C), cond_BC)


class StaticScales:
    """Per-scale forward of a private model copy over fixed buffers: ``(2)B`` rows, ``L`` cache slots."""

    def __init__(self, var: VAR, batch: int, device: torch.device, amp_dtype: torch.dtype | None,
                 graphs: bool, compiled: bool = False):
        self.key = (batch, device, amp_dtype, graphs, compiled)
        self.model = reset_plan(copy.deepcopy(var)).eval().requires_grad_(False)
        if amp_dtype is not None:  # what autocast would cast them to at every call
            for m in self.model.modules():
                if isinstance(m, nn.Linear):
                    m.to(amp_dtype)
        if compiled:   # the compiled engine also runs the FFN's GELU in its first matmul's epilogue
            for block in self.model.blocks:
                block.ffn = FusedFFN.of(block.ffn)
            self.block_step = compile_region(deferred_block, dynamic=None)
            self.head_step = compile_region(deferred_head, dynamic=None)
        self.synced: tuple | None = None
        cfg = var.cfg
        self.starts = cfg.layout.starts
        if compiled:   # traceable appends, storage allocated now (dynamo then sees one cache state)
            self.caches = [KernelKVCache(cfg.L) for _ in self.model.blocks]
            kv_dtype = amp_dtype or self.model.blocks[0].attn.qkv.weight.dtype
            for c in self.caches:
                c.allocate(batch, cfg.H, cfg.C // cfg.H, kv_dtype, device)
        else:
            self.caches = [EagerKVCache(cfg.L) for _ in self.model.blocks]
        # (module, whether it reads the blocks' condition or the class embedding)
        self.modulations: list[tuple[BatchModulation, bool]] = []
        for owner, of_blocks in [(b, True) for b in self.model.blocks] + [(self.model.head, False)]:
            if owner.ada_lin is not None:   # None: shared_aln (the model projects once per scale)
                owner.ada_lin = BatchModulation(owner.ada_lin)
                self.modulations.append((owner.ada_lin, of_blocks))
        self.amp_dtype, self.device = amp_dtype, device
        with torch.no_grad(), self._autocast():
            self.cond_BC = torch.zeros(batch, cfg.C, device=device, dtype=var.class_emb.weight.dtype)
            self._modulate()   # allocates the modulation buffers
            if compiled:   # block 1's "previous FFN branch": zeros, laid out as a block's branch and gate
                gamma_B1C = self.model.blocks[0].modulation(self.model.block_cond(self.cond_BC))[1]
                self.zero_gamma_B1C = torch.empty_strided(gamma_B1C.shape, gamma_B1C.stride(), dtype=gamma_B1C.dtype,
                                                          device=device).zero_()
                self.zero_y = torch.zeros(batch * max(pn * pn for pn in cfg.patch_nums) * cfg.C, device=device,
                                          dtype=kv_dtype)
            x0 = var.sos(self.cond_BC)
            embed_dtype = var.word_embed(torch.zeros(1, 1, cfg.Cvae, device=device,
                                                     dtype=var.word_embed.weight.dtype)).dtype
        self.x_BlC = [torch.zeros(batch, pn * pn, cfg.C, device=device, dtype=x0.dtype if k == 0 else embed_dtype)
                      for k, pn in enumerate(cfg.patch_nums)]
        self.logits_BlV: list[torch.Tensor | None] = [None] * len(cfg.patch_nums)
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.mod_graph: torch.cuda.CUDAGraph | None = None   # _modulate as one graph (batch 1: ~5 launches a block)
        if graphs:
            self.sync(var)
            self._capture()

    def _autocast(self):
        if self.key[2] is None:
            return contextlib.nullcontext()
        # no weight cache: a cached cast made during capture would be freed behind the graph
        return torch.autocast(self.key[1].type, dtype=self.key[2], cache_enabled=False)

    @torch.no_grad()
    def _forward(self, k: int) -> torch.Tensor:
        if not self.key[4]:
            return self.model.forward_scale(self.x_BlC[k], self.cond_BC, self.starts[k], self.caches).float()
        # the compiled engine: VAR.forward_scale with every residual add deferred into the next graph
        m, x_BlC = self.model, self.x_BlC[k]
        B, l, C = x_BlC.shape
        x_BlC = x_BlC + m.scale_pos(self.starts[k], self.starts[k] + l)
        cond_BD = m.block_cond(self.cond_BC)
        y_BlC, gamma_B1C = self.zero_y[:B * l * C].view(B, l, C), self.zero_gamma_B1C
        for block, cache in zip(m.blocks, self.caches):
            x_BlC, y_BlC, gamma_B1C = self.block_step(block, x_BlC, y_BlC, gamma_B1C, cond_BD, cache)
        return self.head_step(m.head, x_BlC, y_BlC, gamma_B1C, self.cond_BC).float()

    @torch.no_grad()
    def _modulate(self) -> None:
        """This batch's AdaLN projections into the :class:`BatchModulation` buffers."""
        with self._autocast():
            cond_BD = self.model.block_cond(self.cond_BC)
            for m, of_blocks in self.modulations:
                m.refresh(cond_BD if of_blocks else self.cond_BC)

    def _reset(self) -> None:
        for c in self.caches:
            c.reset()

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), self._autocast():  # warm-up: allocates caches, creates handles
            for _ in range(2):
                self._modulate()
                self._reset()
                for k in range(len(self.starts)):
                    self._forward(k)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._reset()
        pool = torch.cuda.graph_pool_handle()
        with own_cublas_workspace():   # the graphs' cuBLAS workspace in their pool, and kept out of others
            self.mod_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.mod_graph, pool=pool):
                self._modulate()
            self.graphs = []
            for k in range(len(self.starts)):  # in sampling order: each scale appends to the caches
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool), self._autocast():
                    self.logits_BlV[k] = self._forward(k)
                self.graphs.append(g)
        self._reset()

    @torch.no_grad()
    def sync(self, var: VAR) -> None:
        """Copy ``var``'s parameters in (rounded to the compute dtype) if they changed since the last copy."""
        state = weight_state(var)
        if state != self.synced:
            for dst, src in zip(self.model.parameters(), var.parameters()):
                dst.copy_(src)
            self.synced = state

    def begin(self, var: VAR, cond_BC: torch.Tensor) -> None:
        """Start one batch: current weights, this batch's class embeddings, empty caches."""
        self.sync(var)
        self.cond_BC.copy_(cond_BC)
        if self.mod_graph is None:
            self._modulate()
        else:
            self.mod_graph.replay()
        self._reset()

    def scale(self, k: int, x_BlC: torch.Tensor) -> torch.Tensor:
        """Float logits ``(B, l, V)`` of scale ``k``; valid until the next call of the same scale."""
        self.x_BlC[k].copy_(x_BlC)
        if self.graphs is None:
            return self._forward(k)
        self.graphs[k].replay()
        return self.logits_BlV[k]


def static_engine(var: VAR, batch: int, device: torch.device, compiled: bool | None = None) -> StaticScales:
    """The cached engine of ``var`` for this batch and autocast state (one kept per model).
    CUDA graphs on CUDA; ``compiled`` (None: on CUDA) compiles the blocks and the head."""
    amp, cuda = autocast_dtype(device), device.type == "cuda"
    key = (batch, device, amp, cuda, cuda if compiled is None else compiled)
    eng = _ENGINES.get(var)
    if eng is None or eng.key != key:
        eng = None   # the old engine's buffers and graphs are freed before the new ones are allocated
        _ENGINES.pop(var, None)
        eng = _ENGINES[var] = StaticScales(var, batch, device, amp, graphs=cuda, compiled=key[4])
    return eng


def release_static_engine(var: VAR) -> None:
    """Drop ``var``'s cached engine (its KV caches, weight copy and graphs) to free device memory."""
    _ENGINES.pop(var, None)
