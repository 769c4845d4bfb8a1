import copy
import math

import pytest
import torch

from fastllm.optim import AdEMAMix, alpha_schedule, beta3_schedule
from fastllm.testing import requires_cuda

SHAPES = [(1,), (0,), (7,), (4097,), (33, 65), (3, 5, 7)]
CONFIG = dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=8.0, t_alpha=60, t_beta3=80, eps=1e-8, weight_decay=0.1)


def paper_ademamix(params, grad_fn, steps, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay):
    """AdEMAMix written directly from the paper's Algorithm 1 and schedulers, in fp64."""
    beta1, beta2, beta3 = betas
    params = [p.detach().double().clone() for p in params]
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    nu = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        alpha_t = min(t * alpha / t_alpha, alpha)
        s = min(t / t_beta3, 1.0)
        log1, log3 = math.log(beta1), math.log(beta3)
        beta3_t = min(math.exp(log1 * log3 / ((1 - s) * log3 + s * log1)), beta3)
        for i, g in enumerate(grad_fn(t)):
            g = g.double()
            m1[i] = beta1 * m1[i] + (1 - beta1) * g
            m2[i] = beta3_t * m2[i] + (1 - beta3_t) * g
            nu[i] = beta2 * nu[i] + (1 - beta2) * g * g
            m1_hat, nu_hat = m1[i] / (1 - beta1**t), nu[i] / (1 - beta2**t)
            params[i] = params[i] - lr * ((m1_hat + alpha_t * m2[i]) / (nu_hat.sqrt() + eps) + weight_decay * params[i])
    return params


def make_params(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in SHAPES]


def grads_at(step, like):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in like]


def run(params, optimizer, steps, first_step=1):
    for t in range(first_step, first_step + steps):
        for p, g in zip(params, grads_at(t, params)):
            p.grad = g
        optimizer.step()
    return params


def test_schedules():
    assert alpha_schedule(0, 8.0, 100) == 0.0
    assert alpha_schedule(50, 8.0, 100) == 4.0
    assert alpha_schedule(500, 8.0, 100) == 8.0
    assert alpha_schedule(3, 8.0, None) == 8.0
    assert beta3_schedule(0, 0.9, 0.9999, 100) == pytest.approx(0.9)
    assert beta3_schedule(100, 0.9, 0.9999, 100) == pytest.approx(0.9999)
    assert beta3_schedule(7, 0.9, 0.9999, None) == 0.9999
    # Linear in f(beta) = ln 0.5 / ln beta - 1 (half-life in steps).
    f = lambda b: math.log(0.5) / math.log(b) - 1  # noqa: E731
    assert f(beta3_schedule(25, 0.9, 0.9999, 100)) == pytest.approx(0.75 * f(0.9) + 0.25 * f(0.9999))


def test_beta1_zero_with_beta3_warmup():
    # betas accepts beta1 = 0 (no fast EMA); f(0) = ln 0.5 / ln 0 - 1 = -1 is the limit, not a math error.
    f = lambda b: math.log(0.5) / math.log(b) - 1 if b > 0 else -1.0  # noqa: E731
    assert beta3_schedule(0, 0.0, 0.999, 100) == 0.0
    assert f(beta3_schedule(25, 0.0, 0.999, 100)) == pytest.approx(0.75 * f(0.0) + 0.25 * f(0.999))
    assert beta3_schedule(100, 0.0, 0.999, 100) == pytest.approx(0.999)
    assert beta3_schedule(5, 0.9, 0.0, 100) == 0.0  # beta3 below beta1: the clamp to beta3, as for 0.5
    p = torch.randn(6, requires_grad=True)
    p.grad = torch.randn(6)
    optimizer = AdEMAMix([p], betas=(0.0, 0.999, 0.999), t_alpha=10, t_beta3=10)
    for _ in range(3):
        optimizer.step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("fused", [True, False])
def test_matches_paper_for_120_steps(fused):
    params = make_params()
    optimizer = AdEMAMix(params, fused=fused, **CONFIG)
    run(params, optimizer, 120)
    expected = paper_ademamix(make_params(), lambda t: grads_at(t, params), 120, **CONFIG)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


def test_fused_matches_reference_to_1e6_for_120_steps():
    fused_params, ref_params = make_params(), make_params()
    run(fused_params, AdEMAMix(fused_params, fused=True, **CONFIG), 120)
    run(ref_params, AdEMAMix(ref_params, fused=False, **CONFIG), 120)
    for f, r in zip(fused_params, ref_params):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-7)


def test_param_groups_none_grads_and_closure():
    a, b, c = (torch.randn(5, requires_grad=True) for _ in range(3))
    a_before, c_before = a.detach().clone(), c.detach().clone()
    optimizer = AdEMAMix([{"params": [a]}, {"params": [b, c], "lr": 0.0, "weight_decay": 0.0}], lr=0.1, weight_decay=0.5)
    b_before = b.detach().clone()

    def closure():
        optimizer.zero_grad()
        loss = (a * a).sum() + (b * b).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.item() > 0
    assert not torch.equal(a.detach(), a_before)
    assert torch.equal(b.detach(), b_before)  # lr 0 in its group
    assert torch.equal(c.detach(), c_before) and c not in optimizer.state  # grad None: untouched


def test_sparse_gradients_rejected():
    p = torch.randn(4, requires_grad=True)
    p.grad = torch.randn(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        AdEMAMix([p]).step()


@pytest.mark.parametrize("kwargs,error", [({"lr": -1.0}, ValueError), ({"betas": (0.9, 0.999)}, ValueError),
                                          ({"betas": (0.9, 1.0, 0.9)}, ValueError), ({"t_alpha": 0}, ValueError),
                                          ({"eps": -1.0}, ValueError), ({"state_dtype": torch.float16}, TypeError)])
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        AdEMAMix([torch.randn(2, requires_grad=True)], **kwargs)


def test_fused_true_rejects_unsupported_dtype():
    with pytest.raises(TypeError, match="float16"):
        AdEMAMix([torch.randn(2, dtype=torch.float16, requires_grad=True)], fused=True)


@pytest.mark.parametrize("first_fused,second_fused", [(True, True), (True, False), (False, True)])
def test_state_dict_round_trip_resumes_exactly(first_fused, second_fused):
    uninterrupted = make_params()
    run(uninterrupted, AdEMAMix(uninterrupted, fused=second_fused, **CONFIG), 30)

    params = make_params()
    optimizer = AdEMAMix(params, fused=first_fused, **CONFIG)
    run(params, optimizer, 12)
    saved = copy.deepcopy(optimizer.state_dict())
    params_saved = [p.detach().clone() for p in params]
    resumed = [p.clone().requires_grad_() for p in params_saved]
    optimizer2 = AdEMAMix(resumed, fused=second_fused, **CONFIG)
    optimizer2.load_state_dict(saved)
    run(resumed, optimizer2, 18, first_step=13)
    for r, u in zip(resumed, uninterrupted):
        torch.testing.assert_close(r, u, rtol=1e-6, atol=1e-7)


def test_bf16_params_keep_fp32_states_through_load():
    params = make_params(torch.bfloat16)
    optimizer = AdEMAMix(params, **CONFIG)
    run(params, optimizer, 3)
    state = optimizer.state_dict()
    fresh = AdEMAMix([p.detach().clone().requires_grad_() for p in params], **CONFIG)
    fresh.load_state_dict(state)
    for s in fresh.state.values():
        assert s["exp_avg_fast"].dtype == torch.float32
    for saved, loaded in zip(state["state"].values(), fresh.state.values()):
        assert torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])


def test_bf16_states_train():
    params = make_params()
    optimizer = AdEMAMix(params, state_dtype=torch.bfloat16, stochastic_rounding=True, **CONFIG)
    run(params, optimizer, 10)
    assert all(s["exp_avg_slow"].dtype == torch.bfloat16 for s in optimizer.state.values())
    expected = paper_ademamix(make_params(), lambda t: grads_at(t, params), 10, **CONFIG)
    # Params move up to ~0.1 and bf16 states leave them ~6e-4 off; at 2e-2 an update without the slow
    # EMA (2e-3 off) passed.
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-3, atol=1e-3)


def test_lr_scheduler_drives_lr():
    params = make_params()
    optimizer = AdEMAMix(params, **CONFIG)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    for t in range(1, 4):
        run(params, optimizer, 1, first_step=t)
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(CONFIG["lr"] * 0.125)


def test_training_step_under_torch_compile():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    optimizer = AdEMAMix(model.parameters(), lr=1e-2, t_alpha=20, t_beta3=20)
    x, y = torch.randn(64, 16), torch.randn(64, 1)

    @torch.compile(backend="aot_eager")
    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    losses = [train_step().item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


@requires_cuda
def test_cuda_fused_matches_reference_for_120_steps():
    fused_params, ref_params = make_params(device="cuda"), make_params(device="cuda")
    run(fused_params, AdEMAMix(fused_params, fused=True, **CONFIG), 120)
    run(ref_params, AdEMAMix(ref_params, fused=False, **CONFIG), 120)
    for f, r in zip(fused_params, ref_params):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-6)


def _fsdp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 5))
    fully_shard(model)
    optimizer = AdEMAMix(model.parameters(), **CONFIG)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    for _ in range(5):
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    # numpy arrays pickle by value; tensors would travel by shared memory that dies with this process.
    full = {k: v.full_tensor().numpy() for k, v in model.state_dict().items()}
    if rank == 0:
        queue.put(full)
    # Both ranks past their last collective before either tears gloo down: without it, a rank that
    # destroyed its group while the other's last exchange was in flight once aborted (SIGABRT) in CI.
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_sharded_parameters_step_like_one_process():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_fsdp_worker, args=(rank, 2, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    sharded = queue.get(timeout=120)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 5))
    optimizer = AdEMAMix(model.parameters(), **CONFIG)
    inputs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(rank)) for rank in range(2)]
    for _ in range(5):
        # FSDP averages the ranks' gradients: the same as the mean of the per-rank losses.
        (sum(model(x).pow(2).mean() for x in inputs) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(sharded[name]), value, rtol=1e-5, atol=1e-6)
