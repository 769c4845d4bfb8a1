import copy

import pytest
import torch

import fastllm.ops as ops
from fastllm.ops.ademamix_ref import ademamix_step_reference
from fastllm.testing import BACKWARD_FACTOR, assert_error_ratio, requires_cuda

SHAPES = [(), (1,), (0,), (7,), (4097,), (33, 65), (3, 5, 7)]
HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.999, beta3=0.9995, alpha=5.0, eps=1e-8, weight_decay=0.1,
             bias_correction1=1 - 0.9**3, bias_correction2=1 - 0.999**3)


def make_tensors(shapes, device="cpu", param_dtype=torch.float32, state_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(shape, positive=False):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        return x.abs() + 1e-3 if positive else x

    params = [rand(s).to(device, param_dtype) for s in shapes]
    grads = [rand(s).to(device, param_dtype) for s in shapes]
    m1 = [(0.1 * rand(s)).to(device, state_dtype) for s in shapes]
    m2 = [(0.1 * rand(s)).to(device, state_dtype) for s in shapes]
    nu = [(0.1 * rand(s, positive=True)).to(device, state_dtype) for s in shapes]
    return [params, grads, m1, m2, nu]


def cast(lists, param_dtype, state_dtype):
    return [[t.to(param_dtype if i < 2 else state_dtype) for t in ts] for i, ts in enumerate(lists)]


def run_op(lists, **extra):
    lists = copy.deepcopy(lists)
    ops.ademamix_step_(*lists, **HYPER, **extra)
    return lists


def run_reference(lists):
    lists = copy.deepcopy(lists)
    ademamix_step_reference(*lists, **HYPER)
    return lists


def assert_lists_close(actual, expected, rtol, atol):
    for column_a, column_e in zip(actual, expected):
        for a, e in zip(column_a, column_e):
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def test_cpu_kernel_matches_reference_fp32():
    lists = make_tensors(SHAPES)
    assert_lists_close(run_op(lists), run_reference(lists), rtol=1e-6, atol=1e-7)


def test_cpu_kernel_error_ratio_against_fp64():
    lists64 = make_tensors(SHAPES, param_dtype=torch.float64, state_dtype=torch.float64)
    lists32 = cast(lists64, torch.float32, torch.float32)
    truth, kernel, torch32 = run_reference(lists64), run_op(lists32), run_reference(lists32)
    for column in range(5):
        if column == 1:  # grads are inputs
            continue
        for t, k, b in zip(truth[column], kernel[column], torch32[column]):
            assert_error_ratio("ademamix", k, t, b, factor=BACKWARD_FACTOR)


def test_every_element_is_written():
    lists = make_tensors([(4097,), (5,)])
    before = copy.deepcopy(lists)
    ops.ademamix_step_(*lists, **HYPER)
    for column in (0, 2, 3, 4):
        for new, old in zip(lists[column], before[column]):
            assert (new != old).all()


@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.bfloat16, torch.float32),
                                                     (torch.float32, torch.bfloat16),
                                                     (torch.bfloat16, torch.bfloat16)])
def test_cpu_kernel_bf16_matches_reference(param_dtype, state_dtype):
    lists = make_tensors(SHAPES, param_dtype=param_dtype, state_dtype=state_dtype)
    # Same fp32 math, round-to-nearest stores: at most one bf16 ulp apart where fp32 rounding differs.
    assert_lists_close(run_op(lists), run_reference(lists), rtol=2**-7, atol=1e-6)


def test_stochastic_rounding_is_unbiased_and_seeded():
    lists = make_tensors([(2048,)], param_dtype=torch.float32, state_dtype=torch.float32)
    bf16 = cast(lists, torch.bfloat16, torch.float32)
    # Same bf16 inputs through fp32 math give the exact target of the rounding.
    target = run_reference(cast(bf16, torch.float32, torch.float32))[0][0]
    samples = torch.stack([run_op(bf16, stochastic_rounding=True, seed=s)[0][0].float() for s in range(64)])
    ulp = (target.abs() * 2**-7).clamp_min(1e-30)
    error = (samples.mean(0) - target) / ulp  # per element, in ulps
    bias = error.mean().abs().item()
    assert bias < 0.05, bias
    # Per element and per sign: a rounding biased toward or away from zero (15 or 17 random bits), or
    # one that rounds up with probability 1/2, has a mean bias of ~0 over mixed-sign elements.
    toward_zero = (error * target.sign()).mean().abs().item()
    assert toward_zero < 0.02, toward_zero
    spread = error.abs().mean().item()  # ~0.03 for unbiased rounding over 64 samples
    assert spread < 0.05, spread
    assert torch.equal(run_op(bf16, stochastic_rounding=True, seed=3)[0][0],
                       run_op(bf16, stochastic_rounding=True, seed=3)[0][0])
    assert not torch.equal(samples[0], samples[1])


def test_non_contiguous_tensors_use_reference_path():
    base = make_tensors([(6, 8)])
    lists = [[t.t() for t in column] for column in base]
    assert not lists[0][0].is_contiguous()
    expected = run_reference([[t.contiguous() for t in column] for column in lists])
    ops.ademamix_step_(*lists, **HYPER)
    assert_lists_close([[t.contiguous() for t in c] for c in lists], expected, rtol=1e-6, atol=1e-7)


def test_other_dtypes_use_reference():
    lists = make_tensors([(5, 3)], param_dtype=torch.float16, state_dtype=torch.float32)
    assert_lists_close(run_op(lists), run_reference(lists), rtol=0, atol=0)


def test_reference_backend_switch():
    lists = make_tensors([(9,)])
    with ops.use_backend("reference"):
        assert ops.current_backend() == "reference"
        out = run_op(lists)
    assert ops.current_backend() == "auto"
    assert_lists_close(out, run_reference(lists), rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend"):
        with ops.use_backend("fast"):
            pass


def test_opcheck():
    lists = make_tensors([(5,), (4097,)])
    args = (*lists, *[float(HYPER[k]) for k in ("lr", "beta1", "beta2", "beta3", "alpha", "eps", "weight_decay",
                                                   "bias_correction1", "bias_correction2")], False, 0)
    torch.library.opcheck(torch.ops.fastllm.ademamix_step_.default, args)


def test_torch_compile_fullgraph():
    lists = make_tensors([(5,), (33,)])
    expected = run_reference(lists)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(params, grads, m1, m2, nu):
        ops.ademamix_step_(params, grads, m1, m2, nu, **HYPER)

    step(*lists)
    assert_lists_close(lists, expected, rtol=1e-6, atol=1e-7)


def test_available_reports_backends():
    info = ops.available()
    assert info["build"]["compiled"]
    assert info["ops"]["ademamix_step_"]["cpu"] == "cpp"
    assert info["ops"]["ademamix_step_"]["cuda"] in ("cuda", "reference")


def test_bad_inputs_name_the_argument():
    lists = make_tensors([(4,), (3,)])
    with pytest.raises(ValueError, match="grads has 1 tensors"):
        ops.ademamix_step_(lists[0], lists[1][:1], *lists[2:], **HYPER)
    bad = copy.deepcopy(lists)
    bad[1][1] = bad[1][1].double()
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        ops.ademamix_step_(*bad, **HYPER)
    bad = copy.deepcopy(lists)
    bad[3][0] = torch.ones(5)
    with pytest.raises(ValueError, match=r"exp_avgs_slow\[0\].*shape"):
        ops.ademamix_step_(*bad, **HYPER)
    bad = copy.deepcopy(lists)
    bad[0][0] = torch.ones(4, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"params\[0\].*dtype"):
        ops.ademamix_step_(*bad, **HYPER)
    bad = copy.deepcopy(lists)
    bad[4][1] = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\] is on meta"):
        ops.ademamix_step_(*bad, **HYPER)
    bad = copy.deepcopy(lists)
    bad[1][0] = torch.ones(4).to_sparse()
    with pytest.raises(TypeError, match=r"grads\[0\].*dense"):
        ops.ademamix_step_(*bad, **HYPER)
    with pytest.raises(ValueError, match="bias_correction"):
        ops.ademamix_step_(*lists, **{**HYPER, "bias_correction1": 0.0})


@requires_cuda
@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.float32),
                                                     (torch.float32, torch.bfloat16),
                                                     (torch.bfloat16, torch.bfloat16)])
def test_cuda_kernel_matches_reference(param_dtype, state_dtype):
    lists = make_tensors(SHAPES + [(1 << 20) + 3], device="cuda", param_dtype=param_dtype, state_dtype=state_dtype)
    tol = dict(rtol=1e-6, atol=1e-7) if (param_dtype, state_dtype) == (torch.float32, torch.float32) else \
        dict(rtol=2**-7, atol=1e-6)
    assert_lists_close(run_op(lists), run_reference(lists), **tol)


@requires_cuda
def test_cuda_kernel_many_and_unaligned_tensors():
    # 150 tensors need three launches; views at odd offsets take the unvectorised path.
    shapes = [(i % 37 + 1,) for i in range(150)]
    lists = make_tensors(shapes, device="cuda")
    backing = [[torch.cat([torch.zeros(1, device="cuda"), t]) for t in column] for column in lists]
    views = [[b[1:] for b in column] for column in backing]
    expected = run_reference(lists)
    ops.ademamix_step_(*views, **HYPER)
    assert_lists_close(views, expected, rtol=1e-6, atol=1e-7)


@requires_cuda
def test_cuda_stochastic_rounding_matches_cpu():
    lists = make_tensors([(4099,)], param_dtype=torch.bfloat16, state_dtype=torch.bfloat16)
    cpu = run_op(lists, stochastic_rounding=True, seed=11)
    gpu = run_op([[t.cuda() for t in c] for c in lists], stochastic_rounding=True, seed=11)
    for column_c, column_g in zip(cpu, gpu):
        for c, g in zip(column_c, column_g):
            torch.testing.assert_close(g.cpu(), c, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("name", ["lr", "beta3", "bias_correction1"])
@pytest.mark.parametrize("value", ["0.5", None, 1j])
def test_hyperparameters_must_be_real_numbers(name, value):
    """A string, None or complex hyperparameter used to fail in float() or a comparison, naming none."""
    lists = make_tensors([(4,), (3,)])
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        ops.ademamix_step_(*lists, **{**HYPER, name: value})
