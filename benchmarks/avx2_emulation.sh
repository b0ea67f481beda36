#!/usr/bin/env bash
# Runs a command with PyTorch, MKL, oneDNN and inductor limited to AVX2 (+FMA) instructions, so that an
# AVX-512/AMX machine executes the fp32 kernels an AVX2-only CPU would. It does not make the machine an
# AVX2 one: clock, caches, cores and memory stay this machine's (an Intel Xeon capped this way measured
# 199 fp32 GFLOP/s on 2 threads where the project's AVX2-only EPYC measured 110), so its times are not an
# AVX2 CPU's times; its ratios between recipes are fp32 ratios. bf16 autocast is turned off by the
# command's own flag (run.py --no-bf16), as the library does by itself on a CPU without bf16.
#
#   bash benchmarks/avx2_emulation.sh .venv/bin/python run.py --no-bf16 ...
set -euo pipefail
export ATEN_CPU_CAPABILITY=avx2       # ATen's vectorised kernels, and inductor's generated C++ (cpu_vec_isa)
export MKL_ENABLE_INSTRUCTIONS=AVX2   # MKL's fp32 GEMM (torch.mm on a CPU)
export ONEDNN_MAX_CPU_ISA=AVX2        # oneDNN (mkldnn) kernels
exec "$@"
