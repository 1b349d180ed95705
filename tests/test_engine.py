"""The ELBO engine against the plain computation: class sharing, chunking, input gradients, options."""

import json

import pytest
import torch

from pipeline import rng
from pipeline.bench.elbo import count_flops
from pipeline.defenses.base import Cost
from pipeline.defenses.elbo import ElboEngine, Evaluations, plan
from pipeline.defenses.execution import EngineOptions
from pipeline.defenses.rdc import RDC
from pipeline.defenses.reference import reference_logits
from pipeline.diffusion.schedule import VPSchedule
from pipeline.models.unet import UNet, unet_config
from pipeline.errors import ConfigError
from pipeline.rng import Draw


# Two levels, two ResBlocks a level, attention at 8x8: the shared terms sit in other places
# than in the digits UNet (the first level has two blocks, the last block reads 32 + 16 channels).
WIDE = {"in_channels": 3, "image_size": 16, "num_classes": 4, "base_channels": 16, "channel_mult": [1, 2],
        "num_res_blocks": 2, "attn_resolutions": [8], "dropout": 0.0}


def _unet(cfg, seed=0):
    """A float64 UNet with every weight random (the zero-initialised output layers too)."""
    cfg = {k: v for k, v in cfg.items() if k != "arch"}
    torch.manual_seed(seed)
    model = UNet(**cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return model


def _draw(ids, calls=0):
    ids = torch.as_tensor(ids)
    return Draw(0, ids, torch.full_like(ids, calls))


@pytest.mark.parametrize("cfg", [unet_config("digits"), WIDE], ids=["digits", "wide"])
def test_shared_and_conditional_equal_the_forward_pass(cfg):
    model = _unet(cfg)
    M, K = 5, cfg["num_classes"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, cfg["in_channels"], cfg["image_size"], cfg["image_size"], generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (M,), generator=g)
    shared = model.shared(x, t)
    # The split is taken where the network allows it: first block, last block, time embedding.
    assert {"h0", "temb", "first", "last", "last_skip"} <= set(shared)
    # Irregular rows: images repeated a different number of times, classes in any order, the null class too.
    rows = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4])
    y = torch.tensor([2, 0, K, 1, 3, 3, 0, K, 1, 2, 0]) % (K + 1)
    with torch.no_grad():
        got = model.conditional(shared, rows, y)
        want = model(x[rows], t[rows], y)
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)
    # The stem's adjoint is the transpose of its linear part: <g, stem(x) - stem(0)> = <stem_adjoint(g), x>.
    gh = torch.randn(shared["h0"].shape, generator=g, dtype=torch.float64)
    linear = shared["h0"] - model.stem(torch.zeros_like(x))
    assert torch.allclose((gh * linear).sum(), (model.stem_adjoint(gh) * x).sum(), rtol=1e-10)


def test_shared_work_is_counted_once_per_image():
    model = _unet(unet_config("digits"))
    M, K = 6, 10
    x, t = torch.randn(M, 1, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (M,))
    rows, y = torch.arange(M).repeat_interleave(K), torch.arange(K).repeat(M)
    with torch.no_grad():
        shared = count_flops(lambda: model.conditional(model.shared(x, t), rows, y))
        plain = count_flops(lambda: model(x[rows], t[rows], y))
    # Per image rather than per (image, class): the stem conv (1 -> 24, 3x3), the first conv1
    # (24 -> 24, 3x3), the last block's conv1 and 1x1 skip on its 24 stem-skip channels, over
    # 8x8 pixels; and the time MLP (24 -> 96 -> 96). 1.45 of the 17.2 MFLOP of a forward pass.
    per_image = 2 * 64 * (24 * 1 * 9 + 24 * 24 * 9 + 24 * 24 * 9 + 24 * 24) + 2 * (24 * 96 + 96 * 96)
    assert plain - shared == (M * K - M) * per_image


@pytest.mark.parametrize("cfg", [unet_config("digits"), WIDE], ids=["digits", "wide"])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_engine_equals_the_plain_computation_values_and_gradients(cfg, chunk):
    """Logits and input gradients of the engine (shared terms, chunks cutting pairs anywhere)
    against one network call per (class, timestep), in float64."""
    model = _unet(cfg)
    K = cfg["num_classes"]
    x = torch.rand(2, cfg["in_channels"], cfg["image_size"], cfg["image_size"], dtype=torch.float64,
                   generator=torch.Generator().manual_seed(1))
    draw = _draw([3, 11])
    rdc = RDC(model, K, cfg["in_channels"], cfg["image_size"], timesteps=3, batch_size=4096,
              engine=EngineOptions(chunk=chunk))
    xg = x.clone().requires_grad_(True)
    got = rdc.evaluate(xg, draw)
    xr = x.clone().requires_grad_(True)
    want = reference_logits(model, xr, rdc.ts, draw, K)
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-10)
    w = torch.randn(2, K, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (g_engine,) = torch.autograd.grad((got * w).sum(), xg)
    (g_plain,) = torch.autograd.grad((want * w).sum(), xr)
    assert g_engine.abs().max() > 0
    assert torch.allclose(g_engine, g_plain, atol=1e-10, rtol=1e-8)
    # The recomputing backward (the gang's VJP path) gives the same gradient.
    ev = rdc.cell_evaluations(x, rdc.grid())
    assert torch.allclose(rdc.elbo.weighted_sum_vjp(x, ev, draw, w), g_plain, atol=1e-10, rtol=1e-8)


class _NoSharing(torch.nn.Module):
    """eps(x_t, t, y) with no class-independent split and no stem: the engine's generic path."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.scale = torch.nn.Embedding(num_classes + 1, 1)

    def forward(self, x_t, t, y):
        return torch.tanh(self.conv(x_t)) * self.scale(y).view(-1, 1, 1, 1) + t.to(x_t).view(-1, 1, 1, 1) / 1000


@pytest.mark.parametrize("kind", ["unet", "no-sharing"])
def test_the_engine_alone_equals_a_loop_over_evaluations_and_its_two_backwards_agree(kind):
    """ElboEngine without RDC: squared errors of hand-made evaluations (pairs in any order, not
    every class, chunks cutting pairs) against ||eps(x_t, t, y) - e_t||^2 one at a time; the
    input gradient of `weighted_sum` taken in forward, recomputed in backward, and by autograd
    through the loop."""
    K = 3
    torch.manual_seed(0)
    if kind == "unet":
        model = _unet({"in_channels": 1, "image_size": 8, "num_classes": K, "base_channels": 8, "channel_mult": [1],
                       "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0})
    else:
        model = _NoSharing(K).double()
    schedule, ts = VPSchedule(), torch.tensor([5, 300, 999])
    ex, cls = torch.tensor([1, 0, 0, 1, 1, 0, 1]), torch.tensor([2, 0, 1, 1, 0, 2, 0])
    j = torch.tensor([0, 2, 2, 1, 0, 0, 2])
    weight = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ev = Evaluations(ex=ex, cls=cls, j=j, ts=ts, weight=weight)
    cost = Cost()
    elbo = ElboEngine(model, schedule, K, batch_size=4096, options=EngineOptions(chunk=2), cost=cost)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    draw = _draw([3, 11])

    xr = x.clone().requires_grad_(True)
    noise = draw.normal(rng.ELBO_NOISE, ts, (1, 8, 8), dtype=torch.float64)  # the e_t the engine draws
    loop = []
    for b, y, i in zip(ex.tolist(), cls.tolist(), j.tolist()):
        t = ts[i:i + 1]
        sqrt_a, s = schedule.coefficients(t, torch.float64)
        x_t = sqrt_a * (2 * xr[b:b + 1] - 1) + s * noise[b, i]
        loop.append((model(x_t, t, torch.tensor([y])) - noise[b, i]).pow(2).sum())
    loop = torch.stack(loop)

    assert torch.allclose(elbo.errors(x, ev, draw), loop.detach(), rtol=1e-10, atol=1e-12)
    assert (cost.forward, cost.backward) == (7, 0)

    up = torch.randn(2, K, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (g_loop,) = torch.autograd.grad((weight * loop * up[ex, cls]).sum(), xr)
    xg = x.clone().requires_grad_(True)
    assert elbo.grads_in_forward(xg)
    out = elbo.weighted_sum(xg, ev, draw)
    want = torch.zeros(2, K, dtype=torch.float64).index_put_((ex, cls), weight * loop.detach(), accumulate=True)
    assert torch.allclose(out, want, rtol=1e-10, atol=1e-12)
    (g_fwd,) = torch.autograd.grad((out * up).sum(), xg)
    elbo.JACOBIAN_VALUES = 0  # no budget for per-(example, class) gradients: backward recomputes
    assert not elbo.grads_in_forward(xg)
    (g_rec,) = torch.autograd.grad((elbo.weighted_sum(xg, ev, draw) * up).sum(), xg)
    assert g_loop.abs().max() > 0
    for g in (g_fwd, g_rec, elbo.weighted_sum_vjp(x, ev, draw, up)):
        assert torch.allclose(g, g_loop, rtol=1e-8, atol=1e-10)


def test_gradients_in_forward_equal_recomputed_gradients_under_pruning():
    """Pruning evaluates a different number of classes per (example, t): both backward paths agree,
    and a finite difference confirms them."""
    model = _unet(unet_config("digits"))
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    rdc = RDC(model, 10, 1, 8, pruning=[[4, 3], [8, 1]], engine=EngineOptions(chunk=13))
    draw = _draw([0, 1, 2])
    w = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def grad(budget):
        rdc.elbo.JACOBIAN_VALUES = budget
        xg = x.clone().requires_grad_(True)
        out = rdc.evaluate(xg, draw)
        return out.detach(), torch.autograd.grad((out * w).sum(), xg)[0]

    out_fwd, g_fwd = grad(1 << 27)
    out_re, g_re = grad(0)  # no budget for per-(example, class) gradients: backward recomputes
    assert torch.allclose(out_fwd, out_re, atol=1e-12, rtol=1e-12)
    assert torch.allclose(g_fwd, g_re, atol=1e-10, rtol=1e-8)
    direction = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    h = 1e-6
    with torch.no_grad():
        plus = (rdc.evaluate(x + h * direction, draw) * w).sum()
        minus = (rdc.evaluate(x - h * direction, draw) * w).sum()
    assert abs(float((plus - minus) / (2 * h)) - float((g_fwd * direction).sum())) < 1e-6 * max(1.0, float(g_fwd.abs().sum()))


def test_logits_do_not_depend_on_chunking_or_layout():
    model = _unet(unet_config("digits"))
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    draw = _draw([5, 6, 7])
    outs = []
    for options in (EngineOptions(chunk=1), EngineOptions(chunk=29), EngineOptions(), EngineOptions(channels_last=False)):
        rdc = RDC(model, 10, 1, 8, timesteps=5, engine=options)
        outs.append(rdc.evaluate(x, draw))
    for out in outs[1:]:
        assert torch.allclose(out, outs[0], atol=1e-12, rtol=1e-12)


def test_plan_covers_every_evaluation_once_in_whole_pairs():
    g = torch.Generator().manual_seed(8)
    ex = torch.randint(0, 4, (200,), generator=g)
    j = torch.randint(0, 9, (200,), generator=g)
    p = plan(ex, j, 9, step=17)
    seen = torch.cat([p.order[p.first[a]:p.first[b]] for a, b in p.bounds])
    assert torch.equal(seen.sort().values, torch.arange(200))
    for a, b in p.bounds:
        # Each chunk is whole pairs, within the step unless a single pair is larger.
        assert b > a and (p.first[b] - p.first[a] <= 17 or b == a + 1)
        keys = (ex * 9 + j)[p.order[p.first[a]:p.first[b]]]
        assert set(keys.tolist()) == set(p.pair[a:b].tolist())


def test_engine_options_are_checked():
    with pytest.raises(ConfigError, match="engine.chunk"):
        EngineOptions(chunk=0)
    with pytest.raises(ConfigError, match="engine.autocast"):
        EngineOptions(autocast="int8")
    with pytest.raises(ConfigError, match="engine.compile"):
        EngineOptions(compile="backward")


def test_engine_spec_takes_forward_only_compilation_and_defenses_come_frozen(tmp_path):
    from pipeline.defenses import build_defense
    from pipeline.config import spec
    from pipeline.models.checkpoint import save_checkpoint

    unet = _unet(unet_config("digits")).float()  # untrained: what is checked is the spec and the frozen weights
    save_checkpoint(tmp_path / "unet", unet, unet_config("digits"))
    table = {"kind": "rdc", "model": str(tmp_path / "unet"), "dataset": "digits", "timesteps": 2,
             "engine": {"compile": "forward", "autocast": "bf16"}}
    rdc = build_defense(spec(table))
    assert rdc.elbo.options.compile == "forward" and rdc.elbo.options.autocast == "bf16"
    # No weight takes a gradient (compiled backward graphs would otherwise compute them all),
    # while the input gradient still flows.
    assert not any(p.requires_grad for p in rdc.parameters())
    x = torch.rand(1, 1, 8, 8, requires_grad=True)
    rdc.elbo.options = EngineOptions()
    rdc.evaluate(x, _draw([0])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="compile"):
        build_defense(spec({**table, "engine": {"compile": "backward"}}))


@pytest.mark.parametrize("size", [4, 8, 16])
def test_attention_as_two_matmuls_equals_the_fused_kernel(size):
    """Short maps on CPU take the matmul path, long ones the fused kernel: both are eq. 1 of Vaswani et al."""
    import torch.nn.functional as F

    from pipeline.models.unet import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(128).double()
    torch.nn.init.normal_(block.proj.weight)
    x = torch.randn(3, 128, size, size, dtype=torch.float64)
    B, C, H, W = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(B, 3, block.heads, C // block.heads, H * W).unbind(1)
    fused = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    expected = x + block.proj(fused.transpose(-1, -2).reshape(B, C, H, W))
    assert block.heads == 2
    assert torch.allclose(block(x), expected, rtol=0, atol=1e-12)


def test_flop_counter_counts_a_known_layer():
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    lin = torch.nn.Linear(7, 11)
    # A convolution is a matmul per output pixel: 2 * B * C_out * H * W * C_in * k * k.
    assert count_flops(lambda: conv(torch.randn(2, 3, 6, 6))) == 2 * 2 * 5 * 36 * 3 * 9
    assert count_flops(lambda: lin(torch.randn(4, 7))) == 2 * 4 * 7 * 11


@pytest.mark.slow  # on a trained digits UNet, which the session trains first
def test_autocast_bf16_predictions_match_float32_on_the_digits_test_split(unet):
    """The check that autocast must pass before a GPU sweep uses it; on a CPU-only machine it
    runs in bf16 on the CPU (a GPU, where present, is checked in bf16 and fp16)."""
    from pipeline.bench.elbo import autocast_agreement

    devices = [("cpu", "bf16")] + ([("cuda", "bf16"), ("cuda", "fp16")] if torch.cuda.is_available() else [])
    for device, dtype in devices:
        result = autocast_agreement(unet, timesteps=4, dtype=dtype, device=device)
        assert result["n"] == 355
        assert result["agreement"] >= 0.99, result


@pytest.mark.slow  # torch.compile runs the C compiler in subprocesses
def test_torch_compile_gives_the_same_logits():
    """torch.compile of the engine's network calls (a small UNet keeps compilation short)."""
    import shutil

    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler")
    cfg = {"in_channels": 1, "image_size": 8, "num_classes": 3, "base_channels": 8, "channel_mult": [1],
           "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    model = _unet(cfg).float()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    draw = _draw([0, 1])
    results = []
    for options in (EngineOptions(), EngineOptions(compile="forward"), EngineOptions(compile=True)):
        xg = x.clone().requires_grad_(True)
        out = RDC(model.requires_grad_(False), 3, 1, 8, timesteps=4, engine=options).evaluate(xg, draw)
        results.append((out.detach(), torch.autograd.grad(out.logsumexp(1).sum(), xg)[0]))
    (eager, g_eager), *compiled = results
    for logits, grads in compiled:  # forward-only and forward-and-backward compilation
        assert torch.allclose(logits, eager, rtol=1e-4, atol=1e-4)
        assert torch.allclose(grads, g_eager, rtol=1e-3, atol=1e-5)


def test_group_norm_in_bf16_channels_last_equals_the_plain_kernel_and_keeps_the_layout():
    from pipeline.models.unet import GroupNorm

    torch.manual_seed(0)
    norm = GroupNorm(8, 72)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(16, 72, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = norm(x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    plain = torch.nn.functional.group_norm(x, 8, norm.weight, norm.bias, norm.eps)
    # Two kernels, two summation orders: equal to bf16 rounding.
    assert torch.allclose(out.float(), plain.float(), rtol=1e-2, atol=1e-2)
    (g,) = torch.autograd.grad(out.float().pow(3).sum(), x)
    (g_plain,) = torch.autograd.grad(plain.float().pow(3).sum(), x)
    assert torch.allclose(g.float(), g_plain.float(), rtol=2e-2, atol=2e-2)


def test_compiled_gradients_in_bf16_on_cpu_are_refused():
    """Inductor's bf16 backward of the UNet is wrong on CPU with this torch: the engine says so instead."""
    cfg = {"in_channels": 1, "image_size": 8, "num_classes": 3, "base_channels": 8, "channel_mult": [1],
           "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    model = _unet(cfg).float().requires_grad_(False)
    x = torch.rand(1, 1, 8, 8, requires_grad=True)
    rdc = RDC(model, 3, 1, 8, timesteps=2, engine=EngineOptions(autocast="bf16", compile=True))
    with pytest.raises(ConfigError, match='compile = "forward"'):
        rdc.evaluate(x, _draw([0])).sum().backward()


def test_auto_autocast_resolves_from_the_options_and_the_device_type_alone(monkeypatch):
    from pipeline import machine
    from pipeline.defenses import execution

    # Native bf16 units change nothing: a CPU runs "auto" in float32 whatever the processor.
    for flags in (frozenset(), frozenset({"avx512f", "amx_bf16", "amx_tile", "avx512_bf16"})):
        monkeypatch.setattr(machine, "cpu_flags", lambda *a, flags=flags: flags)
        for compile in (False, "forward", True):
            auto = EngineOptions(compile=compile)
            assert execution.autocast_dtype(auto, torch.device("cpu")) is None
            assert execution.autocast_dtype(auto, "cuda") == torch.bfloat16
            assert execution.precision(auto, "cpu") == "float32" and execution.precision(auto, "cuda:0") == "bf16"
    assert execution.precision(None, "cpu") == "float32"
    for name, dtype in (("off", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for device in ("cpu", "cuda"):
            assert execution.autocast_dtype(EngineOptions(autocast=name), device) == dtype
            assert execution.precision(EngineOptions(autocast=name), device) == {"off": "float32"}.get(name, name)


def _tiny_unet_folder(folder) -> str:
    """A digits UNet checkpoint with every weight random (the zero-initialised output layer too),
    so that its RDC predictions differ per class and rounding would show."""
    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.models.registry import build_model

    torch.manual_seed(0)
    config = {"arch": "unet", "in_channels": 1, "image_size": 8, "num_classes": 10, "base_channels": 8,
              "channel_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    save_checkpoint(folder, model, config, {"kind": "diffusion", "dataset": "digits"})
    return str(folder)


def test_records_are_bit_identical_whether_or_not_a_benchmark_ran_before(tmp_path, monkeypatch):
    """Hidden state: a bf16 agreement check (bench elbo) used to leave a file in the model cache
    that turned "auto" autocast on for later sweeps on a CPU with bf16 units. The same job must
    give the same bits either way, and its records and plan.json say which precision ran."""
    import pyarrow.compute as pc

    from pipeline import machine
    from pipeline.bench.elbo import autocast_agreement
    from pipeline.config.job import load_job
    from pipeline.runtime.plan import plan, plan_document, run_id_for
    from pipeline.runtime.worker import Worker, WorkerContext
    from pipeline.store import Store

    monkeypatch.setattr(machine, "cpu_flags", lambda *a: frozenset({"avx512f", "amx_bf16", "amx_tile", "avx512_bf16"}))
    folder = _tiny_unet_folder(tmp_path / "unet")
    spec = tmp_path / "job.toml"
    spec.write_text('name = "same"\n[data]\ndataset = "digits"\nlimit = 2\nshard_size = 2\n'
                    f'[[defenses]]\nkind = "rdc"\nmodel = "{folder}"\ntimesteps = 3\n'
                    '[[attacks]]\nkind = "pgd"\nsteps = 1\neot = 1\neps = 0.1\npasses = 2\n')
    job = load_job(spec)
    (unit,) = plan(job, 355)
    run_id = run_id_for(job)

    def run(cache):
        monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(cache))
        out = str(tmp_path / cache.name / "out")
        Store(out).write_json(f"{run_id}/plan.json", plan_document(job, [unit], run_id))
        Worker("w0", "cpu").run_unit(unit, WorkerContext(run_id=run_id, job_hash=job.hash, out=out, seed=0,
                                                          data=job.spec.data))
        store = Store(Store(out).join(run_id))
        return store.read_records().drop_columns(["seconds"]), store.read_json("plan.json")["precision"]

    before, plan_before = run(tmp_path / "fresh-cache")
    bench_cache = tmp_path / "bench-cache"
    bench_cache.mkdir()
    monkeypatch.setenv("ROBUSTSWEEP_CACHE", str(bench_cache))
    check = autocast_agreement(folder, timesteps=3, dtype="bf16", examples=4)
    assert check["n"] == 4 and 0 <= check["agreement"] <= 1
    assert list(bench_cache.iterdir()) == []  # a benchmark reports; it leaves nothing for sweeps to read
    # What an earlier version's bench left in the cache: a passing bf16 check on this very processor.
    (bench_cache / "autocast-agreement.json").write_text(json.dumps(
        {"processor": machine.processor_name(), "torch": torch.__version__, "n": 355, "dtype": "bf16",
         "device": "cpu", "timesteps": 100, "agreement": 1.0}))
    after, plan_after = run(bench_cache)

    assert before.num_rows == 2 and after.equals(before)  # every column but the wall clock, bit for bit
    assert pc.unique(after.column("precision")).to_pylist() == ["float32"]
    assert plan_before == plan_after == {job.defenses[0].name: {"cpu": "float32", "cuda": "bf16"}}
