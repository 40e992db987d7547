#!/usr/bin/env bash
# One round of measurements on the device machine (see RESULTS.md for how it was called).
# Usage: bash benchmarks/device_round.sh STAGE...   Output: JSON lines in $OUT/results.jsonl.
# Inductor/Triton caches travel between calls as .devcache/ind.tgz (git-ignored, carried).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind TRITON_CACHE_DIR=/tmp/ind/triton
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ls .devcache/ind.tgz* >/dev/null 2>&1 && cat .devcache/ind.tgz* | tar xz -C /tmp
R="$OUT/results.jsonl"
run() { echo "## $*" >&2; timeout "${T:-400}" python3 "$@" 2>>"$OUT/stderr.log" | tee -a "$R"; }
# /tmp/base: the benchmarks beside .baseline/varcore (the code before a change) for before-arms
base() { mkdir -p /tmp/base && cp -r benchmarks /tmp/base/ && cp -r .baseline/varcore /tmp/base/; }
for stage in "$@"; do
  case $stage in
    env) nvidia-smi -L; python3 -c 'import torch,triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' ;;
    train16) run benchmarks/train_step.py --case 16:64 --plain --warmup 2 --iters 5
             run benchmarks/train_step.py --case 16:64
             run benchmarks/train_step.py --case 16:64 --attn-impl per_scale ;;
    sample16) run benchmarks/sample.py --case 16:64 --case 16:1 --check-tokens
              run benchmarks/sample.py --case 16:64 --case 16:1 --engine plain --iters 5
              run benchmarks/sample.py --case 16:64 --channels-last --iters 5 ;;
    numerics) run benchmarks/train_step.py --numerics ;;
    train_big) run benchmarks/train_step.py --case 30:32:30 --iters 5
               run benchmarks/train_step.py --case 24:32 --case 20:64 ;;
    profile) run benchmarks/train_step.py --case 16:64 --profile
             run benchmarks/sample.py --case 16:64 --decode-chunk 16 --profile --check-tokens ;;
    decode) run benchmarks/sample.py --case 16:64 --decode-chunk 16 --channels-last
            run benchmarks/sample.py --case 16:64 --channels-last ;;
    decode_compile) run benchmarks/sample.py --case 16:64 --decode-chunk 16 --channels-last --compile-decoder ;;
    final_sample16) run benchmarks/sample.py --case 16:64 --case 16:1 --check-tokens ;;
    final_train) run benchmarks/train_step.py --case 16:64 --plain --warmup 2 --iters 5
                 run benchmarks/train_step.py --case 16:64 --case 20:64 --case 24:32
                 run benchmarks/train_step.py --case 30:32:10 --case 30:32:30 --iters 5 ;;
    last) run benchmarks/sample.py --case 16:64 --case 16:1 --check-tokens
          run benchmarks/sample.py --case 20:64 --case 24:64 --case 20:1 --case 24:1
          run benchmarks/sample.py --case 24:64 --decode-chunk 64 --iters 5 --profile
          run benchmarks/attention.py --depth 16 --batch 64 ;;
    final2) run benchmarks/sample.py --case 16:64 --case 16:1 --check-tokens
            run benchmarks/sample.py --case 20:64 --case 24:64 --case 20:1 --case 24:1
            run benchmarks/train_step.py --case 16:64 --case 24:32 --attn-impl dense ;;
    sample_big) run benchmarks/sample.py --case 20:64 --case 24:64 --case 20:1 --case 24:1 ;;
    # r2-1 also timed sampling with the decoder's last conv padded, and r2-2 a 64-token flex
    # block mask; both options were dropped (RESULTS.md, round 2), so those lines are gone.
    r2_explore) T=80 run benchmarks/train_step.py --case 16:64 --warmup 2 --iters 6
                T=80 run benchmarks/train_step.py --case 16:64 --warmup 2 --iters 6 --flex-options '{"USE_TMA": true}'
                TORCHINDUCTOR_MAX_AUTOTUNE=1 T=200 run benchmarks/train_step.py --case 16:64 --warmup 2 --iters 6 ;;
    r2_final) T=110 run benchmarks/train_step.py --case 16:64 --warmup 2 --iters 8
              T=110 run benchmarks/train_step.py --case 16:64 --warmup 2 --iters 8 --flex-options '{}'
              T=120 run benchmarks/train_step.py --numerics
              T=150 run benchmarks/train_step.py --case 20:64 --case 24:32 --warmup 2 --iters 8
              T=150 run benchmarks/train_step.py --case 20:64 --case 24:32 --warmup 2 --iters 8 --flex-options '{}'
              T=120 run benchmarks/sample.py --case 20:64 --case 24:64 --iters 5 --cudnn-benchmark ;;
    r2_sample) T=200 run benchmarks/sample.py --case 16:64 --case 20:64 --case 24:64 --iters 5
               T=200 run benchmarks/sample.py --case 16:64 --case 20:64 --case 24:64 --iters 5 --no-cudnn-autotune ;;
    r3_explore) python3 -c 'import torch, importlib.util as u; print("cudnn", torch.backends.cudnn.version(), "flash_attn", u.find_spec("flash_attn"), "cutlass", u.find_spec("cutlass"))'
                A16="--only dense --only dense_cudnn --only flex --only split1_cudnn --only split1_flash --only split7_cudnn --only split7_flash --only split7_efficient --only split9_cudnn --only split9_flash"
                T=200 run benchmarks/attention.py --depth 16 --batch 64 $A16
                T=100 run benchmarks/attention.py --depth 24 --batch 32 --only flex --only dense_cudnn --only split7_cudnn --only split7_flash --only split9_cudnn
                S="--attn-impl per_scale --attn-prefix-scales 7 --attn-backends cudnn,flash,efficient,math --warmup 2 --iters 8"
                T=120 run benchmarks/train_step.py --case 16:64 $S
                T=150 run benchmarks/train_step.py --case 24:32 $S --profile ;;
    # r3_layout: .baseline/varcore is the code before a change (git archive of the commit
    # before it, carried); the same benchmark runs on both copies in one call
    base) base ;;
    r3_layout) base
               W="--warmup 2 --iters 8"
               (cd /tmp/base && BENCH_TAG=before T=100 run benchmarks/train_step.py --case 16:64 $W)
               (cd /tmp/base && BENCH_TAG=before T=100 run benchmarks/train_step.py --case 24:32 $W)
               BENCH_TAG=after T=120 run benchmarks/train_step.py --case 16:64 $W
               BENCH_TAG=after T=150 run benchmarks/train_step.py --case 24:32 $W --profile
               BENCH_TAG=after_cdt T=170 run benchmarks/train_step.py --case 24:32 $W --inductor coordinate_descent_tuning=True ;;
    r3_tune) F='"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3'
             B='"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64'
             T=150 run benchmarks/attention.py --depth 24 --batch 32 --only flex \
               --flex-config "b32x64={$F, \"bwd_BLOCK_M1\": 32, \"bwd_BLOCK_N1\": 64, \"bwd_BLOCK_M2\": 64, \"bwd_BLOCK_N2\": 32, \"bwd_num_warps\": 4, \"bwd_num_stages\": 3}" \
               --flex-config "b32x128={$F, \"bwd_BLOCK_M1\": 32, \"bwd_BLOCK_N1\": 128, \"bwd_BLOCK_M2\": 128, \"bwd_BLOCK_N2\": 32, \"bwd_num_warps\": 4, \"bwd_num_stages\": 3}" \
               --flex-config "bs4={$F, $B, \"bwd_num_warps\": 4, \"bwd_num_stages\": 4}" \
               --flex-config "bs2={$F, $B, \"bwd_num_warps\": 4, \"bwd_num_stages\": 2}" \
               --flex-config "f128w8={\"fwd_BLOCK_M\": 128, \"fwd_BLOCK_N\": 64, \"fwd_num_warps\": 8, \"fwd_num_stages\": 3, $B, \"bwd_num_warps\": 4, \"bwd_num_stages\": 3}" \
               --flex-config "f128w4={\"fwd_BLOCK_M\": 128, \"fwd_BLOCK_N\": 64, \"fwd_num_warps\": 4, \"fwd_num_stages\": 3, $B, \"bwd_num_warps\": 4, \"bwd_num_stages\": 3}"
             T=200 run benchmarks/train_step.py --case 24:32 --warmup 2 --iters 8 --profile --profile-top 60
             T=200 run benchmarks/train_step.py --case 20:64 --warmup 2 --iters 8 ;;
    r3_train) F='"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3'
              B='"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_warps": 4'
              for d in 16:64 20:64; do
                T=60 run benchmarks/attention.py --depth ${d%:*} --batch ${d#*:} --only flex --flex-config "bs3={$F, $B, \"bwd_num_stages\": 3}"
              done
              T=280 run benchmarks/train_step.py --case 16:64 --case 20:64
              T=170 run benchmarks/train_step.py --case 24:32 ;;
    r3_sample) T=60 run benchmarks/train_step.py --case 16:64 --plain --warmup 2 --iters 5
               (cd /tmp/base && BENCH_TAG=before T=200 run benchmarks/sample.py --case 16:64 --case 20:64 --case 24:64 --iters 5)
               BENCH_TAG=after T=260 run benchmarks/sample.py --case 16:64 --case 20:64 --case 24:64 --case 16:1 --case 20:1 --case 24:1 --iters 5 ;;
    r3_final) T=150 run benchmarks/train_step.py --case 16:64
              T=330 run benchmarks/sample.py --case 16:64 --case 20:64 --case 24:64 --case 16:1 --case 20:1 --case 24:1 --iters 5 --check-tokens ;;
    r3_rest) T=250 run benchmarks/train_step.py --case 30:32:10 --iters 5
             T=200 run benchmarks/train_step.py --numerics ;;
    # FlashAttention-4 from carried wheels, unpacked (.fa4/site.tar.xz: the wheels of
    # flash-attn-4 4.0.0b36 and its dependencies, extracted and xz-compressed to fit the carry limit)
    # Two carries (64 MiB limit per call): stage fa4_stage carries .fa4 and unpacks it; fa4,
    # called while the machine is still warm, carries .fa4x (libs-core, cuda-bindings, protobuf).
    fa4_stage) mkdir -p /tmp/fa4site && tar xJf .fa4/site.tar.xz -C /tmp/fa4site && echo staged; break ;;
    fa4) mkdir -p /tmp/fa4site
         [ -d /tmp/fa4site/flash_attn ] || tar xJf .fa4/site.tar.xz -C /tmp/fa4site
         [ -f .fa4x/extra.tar.xz ] && tar xJf .fa4x/extra.tar.xz -C /tmp/fa4site
         export PYTHONPATH=.:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
         python3 -c 'import flash_attn.cute, cutlass; print("fa4 imports")' 2>&1 | tail -8
         T=240 run benchmarks/attention.py --depth 16 --batch 64 --only flex --only split1_fa4 --only split7_fa4
         T=100 run benchmarks/attention.py --depth 20 --batch 64 --only flex --only split7_fa4
         T=200 run benchmarks/train_step.py --case 20:64 --attn-impl per_scale --attn-prefix-scales 7 --attn-backends fa4 --warmup 2 --iters 8 ;;
    # round 4: 64-token flex block-mask tiles (varcore.flex) against flex's 128
    r4_env) python3 -c 'import torch, inspect, torch._inductor.config as c; from torch._inductor.kernel.flex import flex_attention as f
print(torch.__version__, "inductor_choices_class" in dir(c)); src = inspect.getsource(f)
i = src.find("SPARSE_KV_BLOCK_SIZE % conf"); print(src[i-200:i+300] if i >= 0 else "no conf-tile check")' ;;
    r4_attn) F='"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3'
             B='"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64'
             T=240 run benchmarks/attention.py --depth 24 --batch 32 --only flex --only flex128 \
               --flex-config "b32x64={$F, \"bwd_BLOCK_M1\": 32, \"bwd_BLOCK_N1\": 64, \"bwd_BLOCK_M2\": 64, \"bwd_BLOCK_N2\": 32, \"bwd_num_warps\": 4, \"bwd_num_stages\": 3}" \
               --flex-config "bs4={$F, $B, \"bwd_num_warps\": 4, \"bwd_num_stages\": 4}" \
               --flex-config "bw8={$F, $B, \"bwd_num_warps\": 8, \"bwd_num_stages\": 3}" \
               --flex-config "f32={\"fwd_BLOCK_M\": 32, \"fwd_BLOCK_N\": 64, \"fwd_num_warps\": 4, \"fwd_num_stages\": 3, $B, \"bwd_num_warps\": 4, \"bwd_num_stages\": 3}"
             T=90 run benchmarks/attention.py --depth 20 --batch 64 --only flex --only flex128 ;;
    r4_train24) W="--warmup 2 --iters 8"
                BENCH_TAG=after T=200 run benchmarks/train_step.py --case 24:32 $W
                BENCH_TAG=before T=200 run benchmarks/train_step.py --case 24:32 $W --flex-mask-block 128 ;;
    r4_train20) W="--warmup 2 --iters 8"
                BENCH_TAG=after T=200 run benchmarks/train_step.py --case 20:64 $W
                BENCH_TAG=before T=200 run benchmarks/train_step.py --case 20:64 $W --flex-mask-block 128 ;;
    r4_tiles) T1='"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_warps": 4'
              for d in 16:64 20:64 24:32; do
                T=150 run benchmarks/attention.py --depth ${d%:*} --batch ${d#*:} --only flex \
                  --flex-config "b32x64={$T1, \"bwd_num_stages\": 3}" --flex-config "b32x64s4={$T1, \"bwd_num_stages\": 4}" \
                  --flex-config "b16x64={$T1, \"bwd_BLOCK_M1\": 16, \"bwd_BLOCK_N2\": 16, \"bwd_num_stages\": 3}"
              done ;;
    r4_train) O='{"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_warps": 4, "bwd_num_stages": 3}'
              W="--warmup 2 --iters 8"
              BENCH_TAG=after T=200 run benchmarks/train_step.py --case 20:64 $W --flex-options "$O"
              BENCH_TAG=before T=200 run benchmarks/train_step.py --case 20:64 $W --flex-mask-block 128
              BENCH_TAG=after T=200 run benchmarks/train_step.py --case 24:32 $W --flex-options "$O" --profile --profile-top 40 ;;
    r4_final) W="--warmup 2 --iters 8"
              T=170 run benchmarks/train_step.py --case 16:64 --case 20:64 $W
              T=130 run benchmarks/train_step.py --case 24:32 $W
              T=150 run benchmarks/train_step.py --numerics
              T=120 run benchmarks/train_step.py --case 30:32:10 --warmup 2 --iters 5 ;;
    r4_resid) W="--warmup 2 --iters 6"     # bf16 residual stream (VARConfig.residual_dtype="autocast", the default)
              T=110 run benchmarks/train_step.py --case 20:64 $W
              T=90 run benchmarks/train_step.py --numerics
              T=100 run benchmarks/train_step.py --case 24:32 $W ;;
    # round 5: the bf16 residual stream (default) at d16/d24, its GPU numerics, a d24 profile
    r5_a) W="--warmup 2 --iters 8"
          T=170 run benchmarks/train_step.py --case 24:32 $W --profile --profile-top 70
          T=120 run benchmarks/train_step.py --case 16:64 $W
          T=150 run benchmarks/train_step.py --numerics ;;
    r5_b) python3 -c 'import torch._inductor.config as c
for k in ("triton.enable_pdl", "triton.mix_order_reduction", "combo_kernels", "triton.cudagraphs"):
    print(k, c._config[k].default if k in c._config else "absent", getattr(c, k.split(".")[0]) if "." not in k else "")'
          W="--warmup 2 --iters 10"
          BENCH_TAG=base T=120 run benchmarks/train_step.py --case 24:32 $W --gaps
          BENCH_TAG=pdl TORCHINDUCTOR_ENABLE_PDL=1 T=170 run benchmarks/train_step.py --case 24:32 $W --gaps
          BENCH_TAG=combo T=170 run benchmarks/train_step.py --case 24:32 $W --inductor combo_kernels=True ;;
    r5_c) W="--warmup 2 --iters 10"   # the whole step as one CUDA graph, against the same code without
          BENCH_TAG=graph T=170 run benchmarks/train_step.py --case 24:32 $W --cuda-graph
          BENCH_TAG=base T=110 run benchmarks/train_step.py --case 24:32 $W
          T=200 run benchmarks/train_step.py --case 30:32:10 --warmup 2 --iters 5 ;;
    # official code and ours in one call (.official: a FoundationVision/VAR checkout, carried, not committed)
    r5_d) W="--warmup 2 --iters 10"
          T=170 run benchmarks/official_step.py --official-root .official --case 16:64 --case 20:64 --case 24:32 $W
          T=180 run benchmarks/train_step.py --case 16:64 --case 24:32 $W
          T=140 run benchmarks/train_step.py --case 20:64 $W ;;
    # round 6 (r6-1): the written-out q/k-norm backward against autograd's at d24, same call;
    # --qk-norm-impl was removed after this round, so r6_a runs only on the code of 21803f3
    r6_a) W="--warmup 2 --iters 10"
          BENCH_TAG=explicit T=280 run benchmarks/train_step.py --case 24:32 $W --qk-norm-impl explicit --profile --profile-top 40
          BENCH_TAG=autograd T=250 run benchmarks/train_step.py --case 24:32 $W ;;
    # r6-2: inductor switches at d24, each in its own process, against the default in the same call
    r6_c) python3 -c 'import torch._inductor.config as c
for k in ("triton.mix_order_reduction", "aggressive_fusion", "triton.cudagraphs", "triton.cooperative_reductions", "loop_ordering_after_fusion", "triton.enable_pdl"):
    print(k, c._config[k].default if k in c._config else "absent")'
          W="--warmup 4 --iters 10"
          BENCH_TAG=base T=150 run benchmarks/train_step.py --case 24:32 $W
          BENCH_TAG=cudagraphs T=170 run benchmarks/train_step.py --case 24:32 $W --inductor triton.cudagraphs=True
          BENCH_TAG=mix_order T=150 run benchmarks/train_step.py --case 24:32 $W --inductor triton.mix_order_reduction=True
          BENCH_TAG=aggressive T=150 run benchmarks/train_step.py --case 24:32 $W --inductor aggressive_fusion=True ;;
    # r7-1: GELU in cuBLASLt epilogues (varcore.fused_mlp): one FFN, then d24 with and without
    r7_a) T=120 run benchmarks/mlp.py --depth 24 --batch 32
          W="--warmup 3 --iters 10"
          BENCH_TAG=fused T=220 run benchmarks/train_step.py --case 24:32 $W --mlp-impl fused --profile --profile-top 30
          BENCH_TAG=plain T=200 run benchmarks/train_step.py --case 24:32 $W --mlp-impl plain ;;
    # r7-2: every cuBLASLt algorithm per epilogue; d24 with GELU (not the bias sum) in the epilogues
    r7_b) T=150 run benchmarks/mlp.py --depth 24 --batch 32 --sweep
          W="--warmup 3 --iters 10"
          BENCH_TAG=fused T=200 run benchmarks/train_step.py --case 24:32 $W --mlp-impl fused --profile --profile-top 30
          BENCH_TAG=plain T=180 run benchmarks/train_step.py --case 24:32 $W --mlp-impl plain ;;
    # r7-3: flex kernel options the block-causal mask allows (every row sees its own scale;
    # each tile row's key tiles are one run); official code and ours at d24, same call
    r7_c) B='"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_warps": 4, "bwd_num_stages": 3'
          T=200 run benchmarks/attention.py --depth 24 --batch 32 --only flex \
            --flex-config "rgs={$B, \"ROWS_GUARANTEED_SAFE\": true}" \
            --flex-config "bac={$B, \"BLOCKS_ARE_CONTIGUOUS\": true}" \
            --flex-config "both={$B, \"ROWS_GUARANTEED_SAFE\": true, \"BLOCKS_ARE_CONTIGUOUS\": true}" \
            --flex-config "both_prescale={$B, \"ROWS_GUARANTEED_SAFE\": true, \"BLOCKS_ARE_CONTIGUOUS\": true, \"PRESCALE_QK\": true}"
          W="--warmup 2 --iters 10"
          T=150 run benchmarks/official_step.py --official-root .official --case 24:32 $W
          BENCH_TAG=fused T=170 run benchmarks/train_step.py --case 24:32 $W
          BENCH_TAG=plain T=150 run benchmarks/train_step.py --case 24:32 $W --mlp-impl plain ;;
    # r7-4: BLOCKS_ARE_CONTIGUOUS with the mask's boundary tiles listed as full (gradients checked
    # against float32), tiles with it; official code and ours at d24, same call
    r7_d) B='"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_warps": 4'
          T=240 run benchmarks/attention.py --depth 24 --batch 32 --only flex --iters 15 \
            --flex-config "nobac={$B, \"bwd_num_stages\": 3}" \
            --flex-config "bs4={$B, \"bwd_num_stages\": 4, \"BLOCKS_ARE_CONTIGUOUS\": true}" \
            --flex-config "fs4={$B, \"bwd_num_stages\": 3, \"BLOCKS_ARE_CONTIGUOUS\": true, \"fwd_num_stages\": 4}"
          W="--warmup 2 --iters 10"
          T=140 run benchmarks/official_step.py --official-root .official --case 24:32 $W
          T=170 run benchmarks/train_step.py --case 24:32 $W ;;
    # r7-5: inductor's reduction switches at d24 (each in its own process, same call)
    r7_e) W="--warmup 3 --iters 10"
          BENCH_TAG=base T=170 run benchmarks/train_step.py --case 24:32 $W --profile --profile-top 40
          BENCH_TAG=no_mix_order T=170 run benchmarks/train_step.py --case 24:32 $W --inductor triton.mix_order_reduction=False --profile --profile-top 40
          BENCH_TAG=multi_kernel T=200 run benchmarks/train_step.py --case 24:32 $W --inductor triton.multi_kernel=1 ;;
    # r7-6: final training figures, official code and ours at d16/d20/d24 in one call (as r5_d)
    r7_f) W="--warmup 2 --iters 10"
          T=170 run benchmarks/official_step.py --official-root .official --case 16:64 --case 20:64 --case 24:32 $W
          T=190 run benchmarks/train_step.py --case 16:64 --case 24:32 $W
          T=150 run benchmarks/train_step.py --case 20:64 $W ;;
    # r7-7: GPU numerics (bf16 fast path vs fp32 plain), d30 with 10 blocks recomputed, the FFN at d16
    r7_g) T=200 run benchmarks/train_step.py --numerics
          T=200 run benchmarks/train_step.py --case 30:32:10 --warmup 2 --iters 5
          T=100 run benchmarks/mlp.py --depth 16 --batch 64 ;;
    # r7-8: wider autotuning of the generated element-wise/reduction kernels at d24, with the
    # official code in the same call
    r7_h) W="--warmup 2 --iters 10"
          T=100 run benchmarks/official_step.py --official-root .official --case 24:32 $W
          BENCH_TAG=base T=150 run benchmarks/train_step.py --case 24:32 $W
          BENCH_TAG=cdt_wide T=260 run benchmarks/train_step.py --case 24:32 $W --inductor max_autotune_pointwise=True --inductor coordinate_descent_check_all_directions=True ;;
    # r8-1: the trainer's step as one CUDA graph (varcore.step.TrainStep): replays against eager
    # steps (losses, norms, weights), then d24 official / eager / graph in one call
    r8_a) W="--warmup 3 --iters 10"
          T=200 run benchmarks/train_step.py --graph-check
          T=100 run benchmarks/official_step.py --official-root .official --case 24:32 $W
          BENCH_TAG=eager T=170 run benchmarks/train_step.py --case 24:32 $W --eager
          BENCH_TAG=graph T=170 run benchmarks/train_step.py --case 24:32 $W ;;
    # r8-2: bf16 master weights (varcore.master_weights): graph check with three arms, then d24
    # official / graph / graph + master weights in one call
    r8_b) W="--warmup 3 --iters 10"
          T=170 run benchmarks/train_step.py --graph-check
          T=100 run benchmarks/official_step.py --official-root .official --case 24:32 $W
          BENCH_TAG=graph T=160 run benchmarks/train_step.py --case 24:32 $W --no-master
          BENCH_TAG=graph_master T=160 run benchmarks/train_step.py --case 24:32 $W ;;
    # r8-3: official and ours (CUDA graph + master weights, the trainer's one-GPU step) at d16/d20/d24
    r8_c) W="--warmup 3 --iters 10"
          T=190 run benchmarks/official_step.py --official-root .official --case 16:64 --case 20:64 --case 24:32 $W
          T=200 run benchmarks/train_step.py --case 16:64 --case 24:32 $W
          T=150 run benchmarks/train_step.py --case 20:64 $W ;;
    # r8-4: GPU numerics (bf16 fast path vs fp32 plain), d30 with 10 blocks recomputed, d24 profile
    r8_d) T=200 run benchmarks/train_step.py --numerics
          T=220 run benchmarks/train_step.py --case 30:32:10 --warmup 3 --iters 5
          T=170 run benchmarks/train_step.py --case 24:32 --warmup 3 --iters 5 --profile --profile-top 40 ;;
    # r8-6: after review fixes (capture checks, rounding-exact kernel ops): graph check; d24
    # official / ours / ours with the trainer's clipping
    r8_e) W="--warmup 3 --iters 10"
          T=170 run benchmarks/train_step.py --graph-check
          T=100 run benchmarks/official_step.py --official-root .official --case 24:32 $W
          T=160 run benchmarks/train_step.py --case 24:32 $W
          BENCH_TAG=clip2 T=160 run benchmarks/train_step.py --case 24:32 $W --grad-clip 2.0 ;;
    # r8-7: a checkpointed and resumed one-GPU run (graph, master weights) against a straight one
    # (pipeline.train_loop's checkpoint code needs tqdm and PyYAML: wheels carried in .whl/)
    r8_f) python3 -c 'import tqdm, yaml' 2>/dev/null || pip install -q --no-index --find-links .whl tqdm pyyaml
          T=300 run benchmarks/train_step.py --resume-check ;;
    *) python3 "$@"; break ;;
  esac
done
[ -n "${NOCACHE:-}" ] || tar czf - -C /tmp ind 2>/dev/null | split -b 15m - "$OUT/ind.tgz."; ls -la "$OUT"
