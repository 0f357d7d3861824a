"""Speed and memory of the CAM -> explanation-loss step (forward + backward), CPU.

Variants (all compute the ``due`` loss with weights, identical values):
  eager        the PyTorch reference (due_ext.ops.explanation_loss_reference)
  compiled     torch.compile of the reference
  separable    torch.compile of a formulation whose trilinear upsample is three small matmuls
  ours         due_ext.ops.explanation_loss (C++ kernel)
  ours-bf16    the same op given bfloat16 A and alpha, as a network under CPU autocast hands them over (the
               volumes stay float32); the op computes in float32 and returns bfloat16 loss and gradients

Time: median of ``--repeat`` forward+backward runs after warm-up, all variants in this process.
Peak extra memory: each variant in a fresh subprocess (glibc mmap threshold fixed at 128 KiB so freed tensors
leave RSS); after two warm-up runs (compilation included) the
kernel's peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``), then the variant runs and the growth of
``VmHWM`` over the ``VmRSS`` before the run is reported. Bandwidth: bytes our op must read (A, mask, soft
target, weights) per fwd+bwd over its time, against a copy (clone) bandwidth measured in the same run.

    python benchmarks/bench_explanation_loss.py [--repeat 10] [--sizes paper,demo] [--variants ours,ours-bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

SIZES = {
    # name: (B, C, (d, h, w), (X, Y, Z))
    "paper": (4, 512, (4, 4, 4), (128, 128, 64)),
    "demo": (4, 64, (4, 4, 2), (64, 64, 32)),
}
VARIANTS = ("eager", "compiled", "separable", "ours", "ours-bf16")


def make_inputs(size: str, seed: int = 0):
    batch, channels, low, full = SIZES[size]
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn((batch, channels, *low), generator=gen).relu_()
    alpha = torch.randn((batch, channels), generator=gen) * 0.01
    mask = (torch.rand((batch, *full), generator=gen) > 0.9).float()
    soft = torch.rand((batch, *full), generator=gen)
    weights = torch.rand((batch, *full), generator=gen)
    return features, alpha, mask, soft, weights


def interpolation_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """(out, in) weights of a linear upsample with align_corners=True."""
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = torch.arange(out_size, dtype=torch.float64) * scale
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    f = (src - i0).float()
    matrix = torch.zeros(out_size, in_size)
    matrix[torch.arange(out_size), i0] += 1 - f
    matrix[torch.arange(out_size), i1] += f
    return matrix


def separable_due_loss(features, alpha, mask, soft, weights, mx, my, mz):
    """The DUE loss with the upsample as three matmuls (lets torch.compile fuse the rest)."""
    cam = torch.relu(torch.einsum("bcdhw,bc->bdhw", features, alpha))
    up = torch.matmul(cam, mz.t())  # (B, d, h, Z)
    up = torch.matmul(my, up)  # (B, d, Y, Z)
    up = torch.einsum("xi,biyz->bxyz", mx, up)  # (B, X, Y, Z)
    flat = up.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    s = (up - low.view(-1, 1, 1, 1)) / (high - low + 1e-6).view(-1, 1, 1, 1)
    fg = (mask != 0).float()
    binary = (weights * fg * (torch.tanh(5 * (s - 0.5)) - mask).abs()).flatten(1).sum(1)
    binary = binary / fg.flatten(1).sum(1).clamp_min(1)
    return binary + (weights * (s - soft).abs()).flatten(1).mean(1)


def variant_inputs(name: str, inputs):
    """The inputs a variant is timed on: ``ours-bf16`` gets A and alpha in bfloat16."""
    if name == "ours-bf16":
        return (inputs[0].bfloat16(), inputs[1].bfloat16(), *inputs[2:])
    return inputs


def build_variant(name: str, inputs):
    from due_ext.ops import explanation_loss
    from due_ext.ops.explanation_loss_reference import explanation_loss_reference

    features, alpha, mask, soft, weights = inputs
    if name == "eager":
        return lambda f, a: explanation_loss_reference(f, a, mask, soft, weights, "due")
    if name == "compiled":
        fn = torch.compile(lambda f, a: explanation_loss_reference(f, a, mask, soft, weights, "due"))
        return fn
    if name == "separable":
        size = mask.shape[1:]
        mats = [interpolation_matrix(size[i], features.shape[2 + i]) for i in range(3)]
        fn = torch.compile(separable_due_loss)
        return lambda f, a: fn(f, a, mask, soft, weights, *mats)
    if name in ("ours", "ours-bf16"):
        return lambda f, a: explanation_loss(f, a, mask, soft, weights, "due")
    raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")


def step(fn, features, alpha):
    f = features.detach().requires_grad_(True)
    a = alpha.detach().requires_grad_(True)
    loss = fn(f, a)
    loss.sum().backward()
    return loss.detach(), f.grad, a.grad


def time_variant(fn, inputs, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step(fn, inputs[0], inputs[1])
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step(fn, inputs[0], inputs[1])
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_interleaved(runs: dict, repeat: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each ``name -> (fn, inputs)``, the runs alternating so that a changing machine load
    falls on all of them alike (for ratios between variants)."""
    for _ in range(warmup):
        for fn, inputs in runs.values():
            step(fn, inputs[0], inputs[1])
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, (fn, inputs) in runs.items():
            start = time.perf_counter()
            step(fn, inputs[0], inputs[1])
            times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def copy_bandwidth(nbytes: int = 256 << 20, repeat: int = 10) -> float:
    """Bytes moved per second (read + write) by clone() of a ``nbytes`` tensor."""
    src = torch.empty(nbytes // 4).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / sorted(times)[len(times) // 2]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_child(size: str, variant: str) -> None:
    """Run in a subprocess: print peak extra RSS (MiB) of one fwd+bwd after warm-up."""
    inputs = variant_inputs(variant, make_inputs(size))
    fn = build_variant(variant, inputs)
    step(fn, inputs[0], inputs[1])
    step(fn, inputs[0], inputs[1])
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step(fn, inputs[0], inputs[1])
    print(json.dumps({"peak_extra_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_memory(size: str, variant: str) -> float:
    # A fixed mmap threshold makes glibc return every large block to the OS on free, so RSS follows the live
    # tensors (with its default dynamic threshold, freed blocks stay in the heap and later runs show no growth).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run([sys.executable, __file__, "--child", size, variant], capture_output=True, text=True,
                            timeout=1200, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory subprocess for {size}/{variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--sizes", default="paper,demo")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(*args.child)
        return
    import due_ext

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}; {due_ext.backends()['cpp']}")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.2f} GB/s")
    print("| size | variant | fwd+bwd ms | speed-up vs eager | peak extra MiB | max rel diff vs eager |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        inputs = make_inputs(size)
        reference = step(build_variant("eager", inputs), inputs[0], inputs[1])
        # bf16 variants are compared with eager on the same rounded values: the op's own error (output rounding),
        # not the rounding of its inputs (which a network under autocast does before the op)
        rounded = variant_inputs("ours-bf16", inputs)
        rounded_reference = step(build_variant("eager", inputs), rounded[0].float(), rounded[1].float())
        results = {"eager": time_variant(build_variant("eager", inputs), inputs, args.repeat) * 1e3}
        for variant in args.variants.split(","):
            timed = variant_inputs(variant, inputs)
            fn = build_variant(variant, timed)
            got = step(fn, timed[0], timed[1])
            expected = rounded_reference if variant.endswith("-bf16") else reference
            diff = max(((g.float() - r).abs().max() / r.abs().max()).item()
                       for g, r in zip(got, expected, strict=True))
            ms = results["eager"] if variant == "eager" else time_variant(fn, timed, args.repeat) * 1e3
            mib = float("nan") if args.no_memory else peak_memory(size, variant)
            results[variant] = ms
            print(f"| {size} | {variant} | {ms:.2f} | {results['eager'] / ms:.1f}x | {mib:.1f} | {diff:.2e} |",
                  flush=True)
        if "ours" in results:
            features, _, mask, soft, weights = inputs
            nbytes = sum(t.numel() * t.element_size() for t in (features, mask, soft, weights))
            achieved = nbytes / (results["ours"] * 1e-3)
            compiled = [results[v] for v in ("compiled", "separable") if v in results]
            vs_compiled = f"; vs best compiled {min(compiled) / results['ours']:.2f}x" if compiled else ""
            print(f"{size}: ours reads {nbytes / 1e6:.1f} MB per fwd+bwd -> {achieved / 1e9:.2f} GB/s "
                  f"({100 * achieved / bandwidth:.0f}% of copy bandwidth){vs_compiled}", flush=True)
        if "ours" in results and "ours-bf16" in results:
            amp = time_interleaved({v: (build_variant(v, variant_inputs(v, inputs)), variant_inputs(v, inputs))
                                    for v in ("ours", "ours-bf16")}, 2 * args.repeat)
            rounding = max(((g - r).abs().max() / r.abs().max()).item()
                           for g, r in zip(rounded_reference, reference, strict=True))
            print(f"{size}: interleaved medians of {2 * args.repeat}: fp32 {amp['ours'] * 1e3:.2f} ms, bf16 inputs "
                  f"{amp['ours-bf16'] * 1e3:.2f} ms ({amp['ours-bf16'] / amp['ours']:.3f}x); rounding A and alpha "
                  f"to bf16 alone moves eager's loss/gradients by {rounding:.2e} (max rel)", flush=True)
        print(f"{size}: load average now {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
