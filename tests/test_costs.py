"""Counting the work of an image (pathmamba/operations/costs.py): FLOPs, bytes moved, the selective scan apart."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from pathmamba.models.cmb import DCMamba
from pathmamba.operations.costs import BATCH, BYTES_PER_ELEMENT, OpCounter, count, scan_work


def test_every_operator_counts_what_it_reads_and_writes_and_views_nothing():
    a, b = torch.ones(1000), torch.ones(1000)
    counter = OpCounter()
    with counter:
        c = a + b  # reads 2000, writes 1000
        c.add_(a)  # reads c and a, writes c
        c.view(10, 100).t()  # views: nothing moves
    assert counter.elements == 3000 + 3000
    assert counter.flops == 0  # elementwise: counted by its traffic, not as FLOPs


def test_matrix_products_count_two_flops_per_multiply_add():
    counter = OpCounter()
    with counter:
        torch.randn(8, 32) @ torch.randn(32, 4)
    assert counter.flops == 2 * 8 * 32 * 4


def test_a_grouped_convolution_backward_takes_the_forwards_multiply_adds_twice():
    """FlopCounterMode counts a depthwise convolution's weight gradient once per channel too many."""
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    forward = 2 * 2 * 16 * 8 * 8 * 9  # one multiply-add per output element and weight of its group
    counter, torch_counter = OpCounter(), FlopCounterMode(display=False)
    with counter:
        conv(x).sum().backward()
    with torch_counter:
        conv(x).sum().backward()
    assert counter.flops == 3 * forward
    assert torch_counter.get_total_flops() > 3 * forward


def test_the_scan_is_counted_from_its_shapes_and_its_stand_in_not_at_all():
    torch.manual_seed(0)
    block = DCMamba(d_model=8, d_state=4)
    x = torch.randn(BATCH, 6, 6, 8)
    channels, length = 4 * block.d_inner, 36  # four scan directions folded into the channels
    evaluation = count(lambda: block(x), backward=False)
    expected = scan_work(BATCH, channels, length, groups=4, d_state=4, backward=False)
    assert evaluation["scan_exps"] == expected["exps"] / BATCH == channels * length * 4
    assert evaluation["scan_bytes"] == expected["bytes"] / BATCH
    training = count(lambda: block(x).sum().backward(), backward=True)
    assert training["scan_exps"] == 2 * evaluation["scan_exps"]  # the backward recomputes the states
    # The same block's own operators, counted with the real (PyTorch) scan in place: more, by the
    # scan's thousands of small operators, which the stand-in keeps out.
    with_scan = OpCounter()
    with with_scan:
        block(x)
    assert with_scan.elements * BYTES_PER_ELEMENT / BATCH > evaluation["bytes"]
    assert with_scan.flops / BATCH > evaluation["flops"] > 0
    # and the stand-in leaves the module as it was
    assert torch.isfinite(block(x)).all() and block(x).abs().sum() > 0
