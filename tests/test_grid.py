"""Grid sharding on a multi-node Ray cluster with fake GPUs: gangs equal one actor, and survive
a member killed mid-attack and a node removed mid-run."""

import threading
import time

import pytest
import ray
import torch

from pipeline.config import spec
from pipeline.defenses import build_defense
from pipeline.config.job import parse_job
from pipeline.config.run import RunOptions
from pipeline.runtime import run_job
from pipeline.runtime.grid import Gang, shard
from pipeline.runtime.run import default_workers
from pipeline.runtime.worker import Worker
from pipeline.store import Store

from conftest import GPU_NODES, attack_records

TABLES = {
    "rdc": {"kind": "rdc", "dataset": "digits", "model": "optimal", "timesteps": 30},
    "rdc+lm": {"kind": "rdc", "dataset": "digits", "model": "optimal", "timesteps": 30,
               "lm": {"steps": 3, "timesteps": 5}},
    "rdc+lm-exact": {"kind": "rdc", "dataset": "digits", "model": "optimal", "timesteps": 30,
                     "lm": {"steps": 3, "timesteps": 5, "gradient": "exact"}},
    "mi": {"kind": "mi", "dataset": "digits", "mode": "combined"},
}


def gpu_actors(n):
    """n worker actors, each holding one (fake) GPU, so each sits on its own node."""
    assert ray.cluster_resources().get("GPU", 0) >= n, "the session cluster declares too few GPUs"
    return [ray.remote(Worker).options(num_gpus=1, num_cpus=1, max_restarts=0).remote(f"gang-{i}", "cuda", 1)
            for i in range(n)]


@pytest.fixture(scope="module")
def mixup_model(default_models):
    """The "mi" table's default classifier, prepared as a run's driver does before its workers start."""
    return default_models("mixup")


def logits_and_grad(defense, x):
    """Logits (B, K) and d/dx of a fixed weighting of them, for rows bound to ids 10, 11, 12."""
    defense.bind([10, 11, 12][: x.shape[0]], seed=5)
    xg = x.clone().requires_grad_(True)
    out = defense(xg)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    (g,) = torch.autograd.grad((out * w).sum(), xg)
    return out.detach(), g


@pytest.mark.parametrize("name", list(TABLES))
@pytest.mark.parametrize("with_leader", [False, True])
def test_gang_equals_one_actor(ray_cluster, mixup_model, digits, name, with_leader):
    x = digits.x_test[:3]
    table = spec(TABLES[name])
    defense = build_defense(table)
    ref_out, ref_grad = logits_and_grad(defense, x)
    actors = gpu_actors(2 if with_leader else 3)
    gang = Gang(actors, table, local=defense if with_leader else None)
    shard(defense, gang)
    try:
        out, grad = logits_and_grad(defense, x)
    finally:
        shard(defense, None)
        for a in actors:
            ray.kill(a)
    assert gang.size == 3 and gang.calls >= 2
    scale = ref_out.abs().max()
    assert (out - ref_out).abs().max() <= 1e-5 * scale
    assert (grad - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()
    assert torch.equal(out.argmax(1), ref_out.argmax(1))
    # Unsharded again: the defense is back to computing alone, with the same answer.
    again, _ = logits_and_grad(defense, x)
    assert torch.allclose(again, ref_out, rtol=0, atol=0)


def test_lm_steps_are_split_across_the_gang(ray_cluster, mixup_model, digits):
    """RDC+LM with BPDA: every LM step's samples are spread, one gang call per step and member."""
    x = digits.x_test[:3]
    table = spec(TABLES["rdc+lm"])
    defense = build_defense(table)
    actors = gpu_actors(2)
    gang = Gang(actors, table, local=defense)
    shard(defense, gang)
    try:
        defense.bind([1, 2, 3], seed=0)
        with torch.no_grad():
            defense(x)
    finally:
        shard(defense, None)
        for a in actors:
            ray.kill(a)
    assert gang.calls == 3 + 1  # 3 LM steps, then the ELBO grid


ATTACK = {"kind": "pgd", "eps": 0.1, "steps": 6, "eot": 2, "passes": 2, "loss": "ce"}
COLUMNS = ["clean_pred", "adv_pred", "adv_correct", "adv_vote_pred", "linf", "l2"]


def attack_columns(defense, x, y):
    records = attack_records(defense, ATTACK, x, y, [7, 8], seed=3)
    return [{k: r[k] for k in COLUMNS} | {"adv_logits": r["adv_logits"]} for r in records]


def test_member_killed_mid_attack_gives_the_same_result(ray_cluster, mixup_model, digits):
    x, y = digits.x_test[:2], digits.y_test[:2]
    table = spec(TABLES["rdc+lm"])
    defense = build_defense(table)
    undisturbed = attack_columns(defense, x, y)
    actors = gpu_actors(2)
    gang = Gang(actors, table, local=defense)
    shard(defense, gang)
    killed = threading.Event()

    def kill_after_some_calls():
        deadline = time.time() + 60
        while gang.calls < 6 and time.time() < deadline:
            time.sleep(0.005)
        ray.kill(actors[1])
        killed.set()

    killer = threading.Thread(target=kill_after_some_calls)
    killer.start()
    try:
        disturbed = attack_columns(defense, x, y)
    finally:
        killer.join()
        shard(defense, None)
        for a in actors:
            ray.kill(a)
    assert killed.is_set() and gang.lost() == [1] and 1 <= gang.retried <= 2  # later calls skip the lost member
    assert gang.calls > 6  # the attack went on after the kill
    for a, b in zip(undisturbed, disturbed):
        for k in COLUMNS:
            assert a[k] == b[k], k
        assert a["adv_logits"] == pytest.approx(b["adv_logits"], rel=1e-5, abs=1e-5)


def test_fractional_gpus_pack_several_workers_per_gpu(ray_cluster):
    gpus = int(ray.cluster_resources()["GPU"])
    assert gpus >= GPU_NODES
    assert default_workers(1.0) == (gpus, True)
    assert default_workers(0.5) == (2 * gpus, True)
    assert default_workers(0.25) == (4 * gpus, True)


def grid_job(grid_workers):
    return parse_job({
        "name": "grid", "seed": 2,
        "data": {"dataset": "digits", "split": "test", "limit": 6, "shard_size": 1},
        "defenses": [{"kind": "rdc", "model": "optimal", "timesteps": 40, "lm": {"steps": 2, "timesteps": 4},
                      "grid_workers": grid_workers}],
        "attacks": [{"kind": "pgd", "eps": 0.1, "steps": 8, "eot": 2, "passes": 2}],
    })


KEY = ["defense", "attack", "eps", "example_id"]
SAME = ["clean_pred", "adv_pred", "clean_correct", "adv_correct", "adv_vote_pred", "adv_worst_correct"]


def test_node_removed_mid_run(ray_nodes, tmp_path):
    """Gangs of 2 over 4 GPU nodes; one node is removed after the first commit. The run ends with
    one row per key and the predictions of an undisturbed run of the same job without gangs."""
    plain = run_job(grid_job(1), RunOptions(out=str(tmp_path / "plain"), workers=2), progress=False)
    assert plain.ok
    doomed = ray_nodes.add_node(num_cpus=1, num_gpus=1)
    ray_nodes.wait_for_nodes()
    store_dir = tmp_path / "gangs"
    job = grid_job(2)
    assert job.hash == grid_job(1).hash  # grid_workers does not change what a run computes
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(r=run_job(job, RunOptions(out=str(store_dir), workers=4), progress=False)))
    runner.start()
    deadline = time.time() + 120
    while time.time() < deadline and not list(store_dir.glob("*/records/*/*/unit-*.parquet")):
        time.sleep(0.05)
    ray_nodes.remove_node(doomed, allow_graceful=False)
    runner.join(timeout=300)
    assert not runner.is_alive()
    result = outcome["r"]
    assert result.ok and result.done + result.skipped == result.units == 6
    assert result.lost >= 1  # the removed node held a leader or a gang member
    a, b = Store(plain.uri).read_records(), Store(result.uri).read_records()
    keys = list(zip(*(b.column(c).to_pylist() for c in KEY)))
    assert len(keys) == len(set(keys)) == 6
    rows = lambda t: sorted(zip(*(t.column(c).to_pylist() for c in KEY + SAME)))
    assert rows(a) == rows(b)


def test_bench_grid_reports_each_gang(ray_cluster):
    from pipeline.bench.grid import bench_grid

    result = bench_grid(model="optimal", timesteps=20, examples=2, gangs=(1, 2), repeat=1)
    for g in (1, 2):
        assert result[f"logits_seconds_g{g}"] > 0 and result[f"grad_seconds_g{g}"] > 0
    assert result["speedup_logits_g1"] == result["speedup_grad_g1"] == 1.0
    assert result["speedup_logits_g2"] == pytest.approx(result["logits_seconds_g1"] / result["logits_seconds_g2"])


def test_run_waits_for_gpus_then_gives_up_naming_them(ray_cluster):
    from pipeline.errors import ClusterError
    from pipeline.runtime.run import wait_for_gpus
    from pipeline.runtime.submit import entrypoint

    wait_for_gpus(GPU_NODES, 1.0)  # there already: returns at once
    with pytest.raises(ClusterError, match=f"--min-gpus asked for {GPU_NODES + 5}"):
        wait_for_gpus(GPU_NODES + 5, 1.5)
    assert "--min-gpus 4" in entrypoint("jobs/demo.toml", RunOptions(min_gpus=4))


@pytest.fixture(scope="module")
def random_unet(tmp_path_factory):
    """A randomly initialised digits UNet checkpoint: a network RDC whose input gradients come
    from the engine's Jacobian path (one backward a call), where a gang's VJP recomputes."""
    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.models.registry import build_model
    from pipeline.models.unet import unet_config

    folder = tmp_path_factory.mktemp("unet") / "ckpt"
    torch.manual_seed(0)
    config = unet_config("digits")
    save_checkpoint(folder, build_model(config), config, {})
    return str(folder)


def gang_job(defense):
    return parse_job({"name": "gang-cost", "seed": 3,
                      "data": {"dataset": "digits", "split": "test", "limit": 4, "shard_size": 4},
                      "defenses": [defense],
                      "attacks": [{"kind": "pgd", "eps": 0.1, "steps": 2, "eot": 1, "restarts": 1, "passes": 2}]})


def test_a_gang_spends_what_the_cost_model_predicts(ray_cluster, random_unet, tmp_path):
    """A deterministic network RDC (fixed draws) under PGD on a gang of 2: given how many examples
    the attack ran on, the predicted evaluations are exact (one actor's are, tests/test_cost.py),
    and the gang's backward recomputes the forward that one actor's Jacobian path takes once."""
    gang = 2
    from pipeline.defenses.build import defense_structure
    from pipeline.protocol import build_attack
    from pipeline.protocol.cost import unit_cost
    from pipeline.runtime.estimate import device_profile, estimate_units
    from pipeline.runtime.plan import plan

    job = gang_job({"kind": "rdc", "model": random_unet, "timesteps": 2, "draws": "fixed", "grid_workers": gang})
    result = run_job(job, RunOptions(out=str(tmp_path), workers=2), progress=False)
    assert result.ok
    table = Store(result.uri).read_records(columns=["clean_correct", "forward_passes", "backward_passes"])
    recorded = sum(table.column("forward_passes").to_pylist()), sum(table.column("backward_passes").to_pylist())
    (unit,) = plan(job, 4)
    defense = defense_structure(unit.defense_spec, unit.defense)
    attack = build_attack(unit.attack_spec, 10)
    attacked = sum(table.column("clean_correct").to_pylist())
    cost = unit_cost(defense, attack, 4, attacked=attacked, gang=gang)
    assert cost.exact and (cost.forward.lo, cost.backward.lo) == recorded
    single = unit_cost(defense, attack, 4, attacked=attacked)  # the recompute is real: one actor's is short
    assert single.forward.lo < recorded[0] and single.backward.lo == recorded[1]
    (row,) = estimate_units([unit], device_profile("h100"), workers=2).rows
    assert recorded[0] in row.forward and recorded[1] in row.backward


def test_a_gang_of_mixup_inference_spends_within_the_predicted_range(ray_cluster, cnn, tmp_path):
    """MI's draws sharded over 2 actors: the records lie in the range the estimate gives the unit
    on a pool of 2, which counts each backward's recomputed draws."""
    from pipeline.runtime.estimate import device_profile, estimate_units
    from pipeline.runtime.plan import plan

    job = gang_job({"kind": "mi", "mode": "pl", "model": cnn, "n_pl": 4, "grid_workers": 2})
    result = run_job(job, RunOptions(out=str(tmp_path), workers=2), progress=False)
    assert result.ok
    table = Store(result.uri).read_records(columns=["forward_passes", "backward_passes"])
    fwd, bwd = (sum(table.column(c).to_pylist()) for c in ("forward_passes", "backward_passes"))
    (row,) = estimate_units(plan(job, 4), device_profile("h100"), workers=2).rows
    (alone,) = estimate_units(plan(job, 4), device_profile("h100"), workers=1).rows
    assert fwd in row.forward and bwd in row.backward, (row.forward, fwd, row.backward, bwd)
    assert row.forward.lo > alone.forward.lo and row.backward == alone.backward
