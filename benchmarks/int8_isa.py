"""What INT8 buys on each x86 instruction set: one convolution (ResNet-18's 3x3, 128 channels, at the
demo's 16 x 16 feature map, batch 32) in float32 and in int8, timed side by side (alternating) on
one thread, in one process per instruction set that oneDNN is limited to (ONEDNN_MAX_CPU_ISA): AVX2
(no VNNI, the common older CPU), AVX-512 without VNNI, AVX-512 VNNI, and everything this CPU has
(AMX on Sapphire Rapids). PyTorch's int8 convolution here is oneDNN's; onnxruntime cannot be
limited this way (it reads CPUID itself), but its AVX2 int8 kernel has the same three-instruction
inner step as oneDNN's (vpmaddubsw, vpmaddwd, vpaddd where VNNI has one vpdpbusd).

    python benchmarks/int8_isa.py
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

ISAS = ("AVX2", "AVX512_CORE", "AVX512_CORE_VNNI", "ALL")
NAMES = {
    "AVX2": "AVX2 (no VNNI)",
    "AVX512_CORE": "AVX-512, no VNNI",
    "AVX512_CORE_VNNI": "AVX-512 VNNI",
    "ALL": "all this CPU has",
}


def time_one(batch=32, channels=128, side=16, rounds=30):
    """{"fp32": ms, "int8": ms}: medians of `rounds` alternating calls (after 3 warm-up calls each)."""
    import torch

    torch.set_num_threads(1)
    torch.backends.quantized.engine = "onednn"
    torch.manual_seed(0)
    x = torch.rand(batch, channels, side, side).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).eval().to(memory_format=torch.channels_last)
    w = conv.weight.detach()
    scales = w.abs().amax((1, 2, 3)) / 127  # per output channel, symmetric, as --export's INT8 weights
    qw = torch.quantize_per_channel(w, scales, torch.zeros(channels, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.conv2d_prepack(qw, conv.bias.detach(), [1, 1], [1, 1], [1, 1], 1)
    qx = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)  # uint8 activations
    calls = {"fp32": lambda: conv(x), "int8": lambda: torch.ops.quantized.conv2d(qx, packed, 0.05, 0)}
    seconds = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            for _ in range(3):
                call()
        for r in range(rounds):
            for name in list(calls) if r % 2 else list(calls)[::-1]:
                start = time.perf_counter()
                calls[name]()
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) * 1000 for name, s in seconds.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # (a subprocess's own job)
    args = p.parse_args(argv)
    if args.one:
        ms = time_one()
        print(f"{ms['fp32']:.2f} {ms['int8']:.2f}")
        return 0
    print("| oneDNN limited to | fp32 conv (ms) | int8 conv (ms) | int8 speedup |\n|---|---|---|---|")
    for isa in ISAS:
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
        out = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True, check=True)
        fp32, int8 = map(float, out.stdout.split()[-2:])
        print(f"| {NAMES[isa]} | {fp32:.1f} | {int8:.1f} | {fp32 / int8:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
