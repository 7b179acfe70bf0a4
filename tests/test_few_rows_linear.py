"""The concept stream's linears of few rows on a wide model (`FewRowsLinear`): W @ x^T gives what x @ W^T
gives, is taken only for few rows of a wide float32 weight on a CPU, and a whole Flux single-stream block
step under it equals the plain step."""
import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

from headscope.backbones.streams import FewRowsLinear, ImageSide, flux_single_step


def taken(out: torch.Tensor) -> bool:
    """The mode's result is the transpose's view ([in, rows] product, transposed back): not contiguous."""
    return not out.is_contiguous()


@torch.no_grad()
def test_few_rows_of_a_wide_weight_go_through_the_transposed_product_with_the_same_result():
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 1536)
    x = torch.randn(2, 5, 1024)
    with FewRowsLinear():
        out = linear(x)
        no_bias = torch.nn.functional.linear(x, linear.weight)
    assert taken(out) and out.shape == (2, 5, 1536)
    assert torch.allclose(out, linear(x), atol=1e-5)
    assert torch.allclose(no_bias, torch.nn.functional.linear(x, linear.weight), atol=1e-5)


@torch.no_grad()
def test_many_rows_a_narrow_weight_or_float64_take_the_plain_call():
    torch.manual_seed(0)
    wide, narrow = torch.nn.Linear(1024, 1024), torch.nn.Linear(128, 512)
    cases = [(wide, torch.randn(FewRowsLinear.MAX_ROWS + 1, 1024)), (narrow, torch.randn(6, 128)),
             (torch.nn.Linear(1024, 1024).double(), torch.randn(6, 1024, dtype=torch.float64))]
    for module, x in cases:
        with FewRowsLinear():
            out = module(x)
        assert not taken(out) and torch.equal(out, module(x))


@torch.no_grad()
def test_a_wide_single_stream_block_step_equals_the_plain_step():
    torch.manual_seed(0)
    block = FluxSingleTransformerBlock(dim=1024, num_attention_heads=8, attention_head_dim=128).eval()
    states, temb = torch.randn(2, 3, 1024), torch.randn(2, 1024)
    image = ImageSide(torch.randn(2, 8, 16, 128), torch.randn(2, 8, 16, 128))
    plain = flux_single_step.__wrapped__(block, states, temb, image)
    calls = []
    original = FewRowsLinear.__torch_function__

    def counted(self, func, types, args=(), kwargs=None):
        calls.append(func)
        return original(self, func, types, args, kwargs)

    FewRowsLinear.__torch_function__ = counted
    try:
        stepped = flux_single_step(block, states, temb, image)
    finally:
        FewRowsLinear.__torch_function__ = original
    assert calls.count(torch.nn.functional.linear) >= 5  # norm, q, k, v, MLP in, out: the mode was entered
    for got, want in [(stepped.concept_key, plain.concept_key), (stepped.concept_output, plain.concept_output),
                      (stepped.states, plain.states)]:
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
