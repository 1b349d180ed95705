"""Benchmarks, measured side by side in one process: `robustsweep bench elbo`.

`bench_elbo` times RDC logits (and their input gradients) two ways on the same model, inputs
and noise: the reference strategy of the published code (a Python loop over classes,
timesteps in chunks of 64, one example at a time, the model as loaded) and robustsweep's
engine (defenses/elbo.py, running the network as defenses/execution.py says). Both must give the same logits and gradients. The two are run
alternately, each timing the best of `repeat`, so that other load on the machine hits both
alike. FLOPs are counted with torch.utils.flop_counter (convolutions, matmuls, attention)
and set against a dense matmul peak measured in the same run, on the same device, dtype
and threads.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from pipeline.bench.common import best_of, load_average, machine_info, timed
from pipeline.config.defense import parse_defense
from pipeline.data import load_split
from pipeline.defenses import build_defense
from pipeline.defenses.execution import EngineOptions, autocast_dtype, chunk_size
from pipeline.defenses.reference import reference_logits
from pipeline.rng import Draw
from pipeline.training.defaults import prepare_defaults


def _reference_logits(rdc, x: torch.Tensor, draw: Draw, eps_model=None, chunk: int = 64) -> torch.Tensor:
    """The published strategy (defenses/reference.py) on rdc's timesteps, schedule and prior.

    eps_model: the network to call (default rdc.eps_model); the bench passes an untouched
    copy, so that the engine's layout changes do not reach the reference.
    """
    return reference_logits(eps_model or rdc.eps_model, x, rdc.ts, draw, rdc.num_classes, schedule=rdc.schedule,
                            temperature=rdc.temperature, log_prior=rdc.log_prior, chunk=chunk)


def _reference_grads(rdc, x: torch.Tensor, draw: Draw, w: torch.Tensor, eps_model) -> torch.Tensor:
    """d/dx sum(w * logits) the published way: autograd through the class loop, one example at a time."""
    grads = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].detach().requires_grad_(True)
        logits = _reference_logits(rdc, xi, draw.subset(torch.tensor([i])), eps_model)
        grads.append(torch.autograd.grad((logits * w[i:i + 1]).sum(), xi)[0])
    return torch.cat(grads)


def _engine_grads(rdc, x: torch.Tensor, draw: Draw, w: torch.Tensor) -> torch.Tensor:
    xg = x.detach().requires_grad_(True)
    return torch.autograd.grad((rdc.evaluate(xg, draw) * w).sum(), xg)[0]


# The CPU kernels of scaled_dot_product_attention (taken for channels_last inputs) are missing
# from flop_counter's table; they do the work of the attention kernels that are in it.
def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_SDPA_CPU = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}


def count_flops(fn) -> int:
    """FLOPs of fn() as torch.utils.flop_counter counts them (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False, custom_mapping=_SDPA_CPU) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                repeat: int = 10) -> float:
    """Dense matmul FLOP/s of (n, n) @ (n, n) in `dtype` on `device` at the current threads, best of `repeat`."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    (seconds, _), = best_of({"mm": lambda: a @ b}, repeat, device).values()
    return 2.0 * n**3 / seconds


# Where the time of a run goes, by kind of operator (self time of each aten op, torch.profiler).
_KINDS = {
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
                    "aten::convolution", "aten::conv2d", "aten::conv_transpose2d"),
    "matmul_attention": ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::linear"),
    "group_norm": ("aten::native_group_norm", "aten::native_group_norm_backward", "aten::group_norm"),
    "silu": ("aten::silu", "aten::silu_backward", "aten::silu_"),
    "copy_cat_gather": ("aten::copy_", "aten::cat", "aten::index_select", "aten::index", "aten::contiguous",
                        "aten::clone", "aten::upsample_nearest2d", "aten::upsample_nearest2d_backward"),
}


def profile_kinds(fn, device: torch.device, flops_fn=None) -> dict:
    """Seconds of one run of fn() by kind of operator (self time), plus its FLOPs by kind.

    Keys: wall (seconds of the run under the profiler), one entry per kind in _KINDS,
    compiled_fused (torch.compile's generated kernels: fused norms, activations, adds),
    elementwise_other (every other aten op: adds, multiplies, reductions, allocation),
    outside_ops (wall minus all op time: Python and dispatch), convolution_flops and
    convolution_flops_per_s (the convolutions' own rate). flops_fn: what to count FLOPs on
    (default fn), for a compiled fn that must not be traced under the counter.
    """
    from torch.profiler import ProfilerActivity, profile

    with FlopCounterMode(display=False, custom_mapping=_SDPA_CPU) as counter:
        (flops_fn or fn)()
    conv_flops = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(k))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall, _ = timed(fn, device)
    out = {k: 0.0 for k in _KINDS}
    out["compiled_fused"] = 0.0
    other = 0.0
    for e in prof.key_averages():
        if "CompiledFxGraph" in e.key:
            out["compiled_fused"] += e.self_cpu_time_total / 1e6
        if not e.key.startswith("aten::"):
            continue
        seconds = e.self_cpu_time_total / 1e6
        kind = next((k for k, names in _KINDS.items() if e.key in names), None)
        if kind is None:
            other += seconds
        else:
            out[kind] += seconds
    out["elementwise_other"] = other
    out["outside_ops"] = max(0.0, wall - sum(out.values()))
    out["wall"] = wall
    out["convolution_flops"] = conv_flops
    out["convolution_flops_per_s"] = conv_flops / out["convolution"] if out["convolution"] else None
    return out


@contextlib.contextmanager
def _uncompiled(rdc):
    """The engine without torch.compile for a while: the FLOP counter is a dispatch mode, and a
    compiled call traced under it is cached as a graph of plain aten calls, slow ever after."""
    saved = rdc.elbo.options
    rdc.elbo.options = replace(saved, compile=False)
    try:
        yield
    finally:
        rdc.elbo.options = saved


def _uncompiled_call(rdc, fn):
    """fn as a thunk that runs with the engine uncompiled (see _uncompiled)."""
    def run():
        with _uncompiled(rdc):
            return fn()
    return run


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float) -> float:
    """Max |a - b| relative to max |b|; raises AssertionError when above rtol."""
    rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    if not rel <= rtol:
        raise AssertionError(f"engine and reference {what} disagree: max relative difference {rel:.3g}")
    return rel


def bench_elbo(model: str = "default", examples: int = 2, timesteps: int = 1000, repeat: int = 2,
               threads: int | None = 1, device: str = "cpu", chunk: int | None = None,
               channels_last: bool | None = None, compile: bool | str = False, autocast: str = "auto",
               grad: bool = True, profile: bool = False, agreement_timesteps: int = 100) -> dict:
    """Examples/s of the reference strategy and of the engine, for logits and input gradients.

    model: "default" (the digits UNet) or "optimal"; examples: digits test images; timesteps:
    RDC's systematic subsample (1000 = all); threads: torch threads (None: leave as is);
    chunk / channels_last / compile / autocast: the engine's options (defenses/execution.py); with
    autocast in bf16 or fp16 the reference stays float32 (the published code's dtype), the
    peak is measured in the autocast dtype, and `autocast_agreement` compares the engine's
    predictions with float32 on the whole digits test split at `agreement_timesteps`. Returns a
    dict: examples/s of both strategies and their ratio (`ratio`, `grad_ratio`), FLOPs per
    example counted for each, the matmul peak (`peak_flops`, FLOP/s), the engine's achieved
    FLOP/s and `fraction_of_peak` (logits) / `grad_fraction_of_peak`, the relative
    differences between the strategies, and the machine (device, threads, versions, load).
    profile: also `profile`, where one example's time goes in each strategy (profile_kinds).
    """
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    load_before = load_average()
    options = EngineOptions(chunk=chunk, channels_last=channels_last, compile=compile, autocast=autocast)
    spec = parse_defense({"kind": "rdc", "model": model, "dataset": "digits", "timesteps": timesteps})
    prepare_defaults([spec], progress=False)  # building a defense never trains
    rdc = build_defense(spec, device=dev)
    rdc.elbo.options = options
    reference_model = copy.deepcopy(rdc.eps_model)  # the model as loaded, whatever the engine does to its copy
    x, _ = load_split("digits", "test")
    x = x[:examples].to(dev)
    draw = Draw(0, torch.arange(examples), torch.zeros(examples, dtype=torch.int64))
    w = torch.randn(examples, rdc.num_classes, generator=torch.Generator().manual_seed(0)).to(dev)

    compile_s = None
    if compile:  # compilation happens on the first call; time it apart from the runs
        def first_calls():
            with torch.no_grad():
                rdc.evaluate(x[:1], draw.subset(torch.tensor([0])))
            if grad:
                _engine_grads(rdc, x[:1], draw.subset(torch.tensor([0])), w[:1])
        compile_s, _ = timed(first_calls, dev)

    # The peak in the dtype the engine's matmuls and convolutions run in: its autocast dtype
    # (bf16 by default on a GPU), else float32. Measured before and after the timed runs
    # and the higher kept, so that a moment of other load on the machine does not lower it.
    dtype = autocast_dtype(options, dev) or torch.float32
    peak_before = matmul_peak(dev, dtype)
    with torch.no_grad():
        runs = best_of({"reference": lambda: _reference_logits(rdc, x, draw, reference_model),
                         "engine": lambda: rdc.evaluate(x, draw)}, repeat, dev)
    (t_ref, ref), (t_eng, eng) = runs["reference"], runs["engine"]
    # Same noise, same model: float32 agrees to rounding; autocast (GPU) to its precision.
    low = dtype != torch.float32
    logit_rel = _close(eng, ref, "logits", 2e-2 if low else 1e-4)
    one = (x[:1], draw.subset(torch.tensor([0])))
    with torch.no_grad():
        ref_flops = count_flops(lambda: _reference_logits(rdc, *one, reference_model))
        with _uncompiled(rdc):
            eng_flops = count_flops(lambda: rdc.evaluate(*one))
    result = {
        "model": model, "examples": examples, "timesteps": int(rdc.ts.numel()), "classes": rdc.num_classes,
        "reference_examples_per_s": examples / t_ref, "engine_examples_per_s": examples / t_eng,
        "ratio": t_ref / t_eng,
        "reference_flops_per_example": ref_flops, "flops_per_example": eng_flops,
        "peak": f"(2048, 2048) @ (2048, 2048) {str(dtype)[6:]} matmul, best of 10, before and after the runs",
        "reference_flops_per_s": ref_flops * examples / t_ref, "engine_flops_per_s": eng_flops * examples / t_eng,
        "logits_max_rel_diff": logit_rel,
    }
    if grad:
        runs = best_of({"reference": lambda: _reference_grads(rdc, x, draw, w, reference_model),
                         "engine": lambda: _engine_grads(rdc, x, draw, w)}, max(1, repeat - 1), dev)
        (g_ref_t, g_ref), (g_eng_t, g_eng) = runs["reference"], runs["engine"]
        grad_rel = _close(g_eng, g_ref, "input gradients", 5e-2 if low else 1e-3)
        with _uncompiled(rdc):
            g_eng_flops = count_flops(lambda: _engine_grads(rdc, *one, w[:1]))
        result.update({
            "reference_grad_examples_per_s": examples / g_ref_t, "engine_grad_examples_per_s": examples / g_eng_t,
            "grad_ratio": g_ref_t / g_eng_t,
            "grad_flops_per_example": g_eng_flops,
            "engine_grad_flops_per_s": g_eng_flops * examples / g_eng_t,
            "grads_max_rel_diff": grad_rel,
        })
    peak_after = matmul_peak(dev, dtype)
    peak = max(peak_before, peak_after)
    result.update({"peak_flops": peak, "peak_flops_before_after": [peak_before, peak_after],
                   "fraction_of_peak": result["engine_flops_per_s"] / peak,
                   "reference_fraction_of_peak": result["reference_flops_per_s"] / peak})
    if grad:
        result["grad_fraction_of_peak"] = result["engine_grad_flops_per_s"] / peak
    if profile:
        with torch.no_grad():
            result["profile"] = {"reference": profile_kinds(lambda: _reference_logits(rdc, *one, reference_model), dev),
                                 "engine": profile_kinds(lambda: rdc.evaluate(*one), dev,
                                                         flops_fn=_uncompiled_call(rdc, lambda: rdc.evaluate(*one)))}
        if grad:
            result["profile"]["reference_grad"] = profile_kinds(lambda: _reference_grads(rdc, *one, w[:1], reference_model), dev)
            grads_one = lambda: _engine_grads(rdc, *one, w[:1])  # noqa: E731
            result["profile"]["engine_grad"] = profile_kinds(grads_one, dev, flops_fn=_uncompiled_call(rdc, grads_one))
    if low:
        # The engine's own float32 speed is the other side of the same coin: the peak it is held to.
        result["float32_peak_flops"] = matmul_peak(dev, torch.float32)
        # The check a sweep in low precision relies on: its predictions against float32.
        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        result["autocast_agreement"] = autocast_agreement(model, timesteps=min(timesteps, agreement_timesteps),
                                                          dtype=names[dtype], device=device,
                                                          options=EngineOptions(chunk=chunk, channels_last=channels_last,
                                                                                compile=compile))
    result.update({
        "engine": {"chunk": chunk_size(options, rdc.elbo.batch_size, x), "channels_last": channels_last is not False,
                   "autocast": autocast, "compile": compile, "compile_seconds": compile_s},
        **machine_info(dev), "threads": torch.get_num_threads(), "dtype": str(dtype)[6:], "load_before": load_before, "load_after": load_average(),
    })
    return result


def autocast_agreement(model: str = "default", timesteps: int = 10, dtype: str = "bf16", device: str = "cpu",
                       examples: int | None = None, options: EngineOptions | None = None) -> dict:
    """Predictions of RDC on the digits test split with autocast against float32, same noise.

    options: the engine's other options (chunk, layout, compile) for both runs. Returns n, the fraction of predictions that agree (`agreement`), and the largest logit
    difference relative to the logits' scale (`max_rel_diff`). The result is reported, never kept:
    what a sweep computes depends on its job and the hardware only.
    """
    dev = torch.device(device)
    spec = parse_defense({"kind": "rdc", "model": model, "dataset": "digits", "timesteps": timesteps})
    prepare_defaults([spec], progress=False)
    rdc = build_defense(spec, device=dev)
    x, _ = load_split("digits", "test")
    x = x[:examples].to(dev) if examples else x.to(dev)
    draw = Draw(0, torch.arange(x.shape[0]), torch.zeros(x.shape[0], dtype=torch.int64))
    with torch.no_grad():
        options = options or EngineOptions()
        rdc.elbo.options = replace(options, autocast="off")
        full = rdc.evaluate(x, draw)
        rdc.elbo.options = replace(options, autocast=dtype)
        low = rdc.evaluate(x, draw)
    agree = (full.argmax(1) == low.argmax(1)).double().mean()
    result = {"n": x.shape[0], "dtype": dtype, "device": str(dev), "timesteps": int(rdc.ts.numel()),
              "agreement": float(agree), "disagreements": int((full.argmax(1) != low.argmax(1)).sum()),
              "max_rel_diff": float((full - low).abs().max() / full.abs().max())}
    return result



def format_elbo(result: dict) -> list[str]:
    """The lines `robustsweep bench elbo` prints for a result of `bench_elbo`."""
    lines = [f"RDC logits ({result['model']}, {result['timesteps']} timesteps x {result['classes']} classes, "
             f"{result['threads']} thread(s), {result['device']}): reference {result['reference_examples_per_s']:.3g} ex/s, "
             f"engine {result['engine_examples_per_s']:.3g} ex/s, ratio {result['ratio']:.2f}x; engine "
             f"{result['engine_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * result['fraction_of_peak']:.0f}% of the "
             f"{result['peak_flops'] / 1e9:.1f} GFLOP/s matmul peak"]
    if "engine_grad_examples_per_s" in result:
        lines.append(f"input gradients: reference {result['reference_grad_examples_per_s']:.3g} ex/s, engine "
                     f"{result['engine_grad_examples_per_s']:.3g} ex/s, ratio {result['grad_ratio']:.2f}x; engine "
                     f"{100 * result['grad_fraction_of_peak']:.0f}% of peak")
    if "autocast_agreement" in result:
        a = result["autocast_agreement"]
        lines.append(f"{a['dtype']} against float32 on {a['n']} digits test images ({a['timesteps']} timesteps): "
                     f"{100 * a['agreement']:.2f}% of predictions agree; float32 peak "
                     f"{result['float32_peak_flops'] / 1e9:.1f} GFLOP/s")
    for name, p in result.get("profile", {}).items():
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in p.items() if k not in ("wall", "convolution_flops", "convolution_flops_per_s"))
        rate = p["convolution_flops_per_s"]
        lines.append(f"profile {name} (one example, {p['wall']:.2f} s): {kinds}; convolutions at "
                     f"{(rate or 0) / 1e9:.1f} GFLOP/s")
    lines.append(f"load average {result['load_before']} before, {result['load_after']} after")
    return lines


def bench_edm(preset: str | dict = "edm-cifar10-cond-vp", timesteps: int = 10, examples: int = 1, batch: int = 64,
              repeat: int = 1, threads: int | None = 1, device: str = "cpu", autocast: str = "auto",
              grad: bool = False, pruning: list[tuple[int, int]] | None = None, seed: int = 0) -> dict:
    """A full-size EDM network with random weights: one forward at `batch` in float32 and in bf16
    autocast, and RDC seconds per image through the engine at `timesteps` (logits; with `grad`,
    logits and input gradients), on random images of the network's shape. pruning: also the same
    under adaptive class pruning with these (timesteps, keep) stages (`pruned_*` keys).

    preset: an EDM preset name, or a build_edm config. Random weights cost the same FLOPs as
    trained ones; the figures are speed only.
    """
    from pipeline.defenses.rdc import RDC
    from pipeline.diffusion.denoiser import DenoiserEps
    from pipeline.diffusion.schedule import VPSchedule
    from pipeline.models.edm import build_edm

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    load_before = load_average()
    torch.manual_seed(seed)
    net = build_edm({"preset": preset} if isinstance(preset, str) else preset).to(dev).eval().requires_grad_(False)
    C, R, K = net.img_channels, net.img_resolution, net.label_dim
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, C, R, R, generator=g) * 2 - 1).to(dev)
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 1.2).to(dev)
    labels = torch.nn.functional.one_hot(torch.arange(batch) % K, K).float().to(dev)

    def forward(dtype):
        ctx = torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return net(x, sigma, labels)

    forwards = best_of({"fp32": lambda: forward(None), "bf16": lambda: forward(torch.bfloat16)}, repeat, dev)
    with torch.no_grad():
        flops = count_flops(lambda: net(x, sigma, labels))
    schedule = VPSchedule()
    rdc = RDC(DenoiserEps(net, schedule, K), K, C, R, schedule=schedule, timesteps=timesteps, batch_size=batch,
              engine=EngineOptions(autocast=autocast)).to(dev)
    images = torch.rand(examples, C, R, R, generator=g).to(dev)
    draw = Draw(seed, torch.arange(examples), torch.zeros(examples, dtype=torch.int64))
    w = torch.randn(examples, K, generator=g).to(dev)
    rdc_fns = {"logits": lambda: rdc.evaluate(images, draw)}
    if grad:
        rdc_fns["logits_and_grads"] = lambda: _engine_grads(rdc, images, draw, w)
    if pruning:
        pruned = RDC(DenoiserEps(net, schedule, K), K, C, R, schedule=schedule, pruning=pruning, batch_size=batch,
                     engine=EngineOptions(autocast=autocast)).to(dev)
        rdc_fns["pruned_logits"] = lambda: pruned.evaluate(images, draw)
        if grad:
            rdc_fns["pruned_logits_and_grads"] = lambda: _engine_grads(pruned, images, draw, w)
    logits_only = {k: rdc_fns.pop(k) for k in ("logits", "pruned_logits") if k in rdc_fns}
    with torch.no_grad():  # no warm-up round: the forward timings above warmed the network
        rdc_timed = best_of(logits_only, repeat, dev, warmup=False)
    rdc_timed.update(best_of(rdc_fns, repeat, dev, warmup=False))
    return {
        "preset": preset if isinstance(preset, str) else "custom", "parameters": sum(p.numel() for p in net.parameters()), "batch": batch,
        "forward_seconds": {"fp32": forwards["fp32"][0], "bf16_autocast": forwards["bf16"][0]},
        "forward_flops": flops,
        "forward_flops_per_s": {"fp32": flops / forwards["fp32"][0], "bf16_autocast": flops / forwards["bf16"][0]},
        # Relative to D - x, the network's part (x itself would hide the rounding at small sigma).
        "bf16_max_rel_diff": float((forwards["bf16"][1] - forwards["fp32"][1]).abs().max() / (forwards["fp32"][1] - x).abs().max()),
        "rdc": {"timesteps": int(rdc.ts.numel()), "classes": K, "examples": examples,
                "autocast": autocast, "chunk": chunk_size(rdc.elbo.options, rdc.elbo.batch_size, images),
                "pruning": [list(st) for st in pruning] if pruning else None,
                **{f"{k}_seconds_per_image": v[0] / examples for k, v in rdc_timed.items()}},
        **machine_info(dev), "threads": torch.get_num_threads(),
        "load_before": load_before, "load_after": load_average(),
    }


def format_edm(r: dict) -> str:
    """A few lines for a person: forward seconds in fp32 and bf16, RDC seconds per image."""
    f, rd = r["forward_seconds"], r["rdc"]
    lines = [f"{r['preset']} ({r['parameters']:,} parameters, random weights) on {r['device']}, {r['threads']} threads",
             f"  one forward at batch {r['batch']}: fp32 {f['fp32']:.2f} s, bf16 autocast {f['bf16_autocast']:.2f} s "
             f"({r['forward_flops'] / 1e9:.1f} GFLOP; bf16 max rel diff {r['bf16_max_rel_diff']:.2g})",
             f"  RDC, {rd['timesteps']} timesteps x {rd['classes']} classes, autocast {rd['autocast']}, chunk {rd['chunk']}: "
             f"{rd['logits_seconds_per_image']:.1f} s per image (logits)"]
    if "logits_and_grads_seconds_per_image" in rd:
        lines.append(f"  with input gradients: {rd['logits_and_grads_seconds_per_image']:.1f} s per image")
    if rd.get("pruning"):
        stages = ", ".join(f"{t} timesteps keep {k}" for t, k in rd["pruning"])
        lines.append(f"  pruned ({stages}): {rd['pruned_logits_seconds_per_image']:.1f} s per image (logits)"
                     + (f", {rd['pruned_logits_and_grads_seconds_per_image']:.1f} s with input gradients"
                        if "pruned_logits_and_grads_seconds_per_image" in rd else ""))
    lines.append(f"  load average before/after: {r['load_before'][0]} / {r['load_after'][0]}")
    return "\n".join(lines)
