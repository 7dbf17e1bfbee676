"""The Triton launchers as ``torch.library`` custom ops: schemas, fake kernels, ``torch.compile``.

``torch.library.opcheck`` checks each op's schema (declared mutations), its fake implementation
against the real one (shapes, dtypes, strides), and tracing through AOTAutograd with dynamic
shapes.  Then the autograd op is compiled whole (``fullgraph=True``: no graph breaks) with the
``aot_eager`` backend (inductor on CPU would need a C compiler) and compared with eager.
"""

from __future__ import annotations

import pytest
import torch

from fastadalora.backends import triton_path

ops = torch.ops.fastadalora
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N, IN, OUT, R = 37, 61, 45, 5


def _tensors(dtype):
    x = torch.randn(N, IN).to(dtype)
    A = torch.randn(R, IN).to(dtype)
    B = torch.randn(OUT, R).to(dtype)
    e = torch.randn(R)
    m = (torch.arange(R) % 2).float()
    h = torch.randn(N, R)
    g = torch.randn(N, OUT).to(dtype)
    return x, A, B, e, m, h, g


def _cases(dtype):
    x, A, B, e, m, h, g = _tensors(dtype)
    return {
        "shrink": (ops.shrink, (x, A, e, 0.7, 0, 0.0)),
        "shrink_dropout": (ops.shrink, (x, A, e, 0.7, 1234, 0.25)),
        "shrink_strided_x": (ops.shrink, (torch.randn(IN, N).to(dtype).t(), A, e, 0.7, 0, 0.0)),
        "expand_": (ops.expand_, (torch.randn(N, OUT).to(dtype), h, B)),
        "grad_s": (ops.grad_s, (g, B, h, e, m, 0.7)),
        "grad_x_": (ops.grad_x_, (torch.randn(N, IN).to(dtype), h, A, 99, 0.5)),
        "grad_a": (ops.grad_a, (h, x, 99, 0.5)),
        "grad_b": (ops.grad_b, (g, h, e, 0.7)),
    }


CASES = list(_cases(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_opcheck(case, dtype):
    op, args = _cases(dtype)[case]
    torch.library.opcheck(op, args)


def test_mutating_ops_declare_their_mutation():
    assert ops.expand_.default._schema.arguments[0].alias_info.is_write
    assert ops.grad_x_.default._schema.arguments[0].alias_info.is_write
    for name in ("shrink", "grad_s", "grad_a", "grad_b"):
        assert all(a.alias_info is None for a in getattr(ops, name).default._schema.arguments)


def _adapter(dtype, bias=True):
    params = dict(
        weight=torch.randn(OUT, IN).to(dtype),
        bias=torch.randn(OUT).to(dtype) if bias else None,
        A=torch.randn(R, IN).to(dtype).requires_grad_(),
        E=torch.randn(R, 1).to(dtype).requires_grad_(),
        B=torch.randn(OUT, R).to(dtype).requires_grad_(),
    )
    return params, (torch.arange(R) % 3 != 1).float()


def _step(x, weight, bias, A, E, B, mask):
    y = triton_path.adapter_linear(x, weight, bias, A, E, B, 0.7, mask=mask, dropout_p=0.0)
    return (y.float() ** 2).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_compile_fullgraph_matches_eager(dtype):
    torch._dynamo.reset()
    params, mask = _adapter(dtype)
    x = torch.randn(N, IN).to(dtype).requires_grad_()
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    leaves = [x, params["A"], params["E"], params["B"]]

    loss = _step(x, params["weight"], params["bias"], params["A"], params["E"], params["B"], mask)
    want = torch.autograd.grad(loss, leaves)
    loss_c = compiled(x, params["weight"], params["bias"], params["A"], params["E"], params["B"], mask)
    got = torch.autograd.grad(loss_c, leaves)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_traces_custom_ops():
    # the graph holds our ops as single nodes: the kernels are opaque to dynamo, not broken around
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    params, mask = _adapter(torch.float32, bias=False)
    x = torch.randn(N, IN)
    with torch.no_grad():
        torch.compile(_step, fullgraph=True, backend=backend)(x, params["weight"], None, params["A"],
                                                              params["E"], params["B"], mask)
    assert any("fastadalora.shrink" in t for t in seen) and any("fastadalora.expand_" in t for t in seen)
