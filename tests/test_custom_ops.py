"""The Triton path's custom ops: schemas, fake kernels, ``torch.compile``.

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
N, IN, OUT, R = 37, 61, 45, 5
PLANS = [(torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
         (torch.float16, torch.float16, torch.float16), (torch.bfloat16, torch.float32, torch.float32),
         (torch.bfloat16, torch.float32, torch.bfloat16)]  # (base, adapter, compute)


def _tensors(base, adapter):
    x = torch.randn(N, IN).to(base)
    W = torch.randn(OUT, IN).to(base)
    b = torch.randn(OUT).to(base)
    A = torch.randn(R, IN).to(adapter)
    E = torch.randn(R, 1).to(adapter)
    B = torch.randn(OUT, R).to(adapter)
    m = (torch.arange(R) % 2).to(adapter)
    h = torch.randn(N, R)
    g = torch.randn(N, OUT).to(base)
    return x, W, b, A, E, B, m, h, g


def _cases(base, adapter, cdt):
    x, W, b, A, E, B, m, h, g = _tensors(base, adapter)
    return {
        "forward": (ops.adapter_forward, (x, W, b, A, E, m, B, 0.7, 0, 0.0, cdt)),
        "forward_dropout": (ops.adapter_forward, (x, W, None, A, E, None, B, 0.7, 1234, 0.25, cdt)),
        "forward_strided_x": (ops.adapter_forward, (torch.randn(IN, N).to(base).t(), W, b, A, E, m, B, 0.7, 0, 0.0,
                                                    cdt)),
        "backward": (ops.adapter_backward, (g, x, h, W, A, E, m, B, 0.7, 99, 0.5, cdt, True, True, True, True)),
        "backward_adapter_only": (ops.adapter_backward, (g, x, h, W, A, E, None, B, 0.7, 0, 0.0, cdt, False, True,
                                                         True, True)),
        "backward_x_only": (ops.adapter_backward, (g, x, h, W, A, E, None, B, 0.7, 5, 0.1, cdt, True, False, False,
                                                   False)),
    }


CASES = list(_cases(torch.float32, torch.float32, torch.float32))


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: ",".join(str(d).split(".")[-1] for d in p))
@pytest.mark.parametrize("case", CASES)
def test_opcheck(case, plan):
    op, args = _cases(*plan)[case]
    torch.library.opcheck(op, args)


def test_ops_declare_no_mutation():
    for name in ("adapter_forward", "adapter_backward"):
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
    assert any("fastadalora.adapter_forward" in t for t in seen)
