"""scaleinv_dist.offload: host copies of saved tensors in pieces whose sizes are powers of two,
so that the pinned allocator (which rounds each request up to a power of two) holds exactly the
tensors' bytes."""
import pytest
import torch

from scaleinv_dist.offload import MIN_PIECE, HostOffload, piece_sizes

GiB = 2**30


@pytest.mark.parametrize("nbytes", [0, 1, 4096, MIN_PIECE, MIN_PIECE + 3, 6 * GiB, 6 * GiB + 12345,
                                    2**21 * 768 * 4 + 2**21 * 8])
def test_pieces_add_up_and_are_powers_of_two_but_the_rest(nbytes):
    sizes = piece_sizes(nbytes)
    assert sum(sizes) == nbytes
    *big, last = sizes or [0]
    for s in big:
        assert s >= MIN_PIECE and s & (s - 1) == 0, sizes
    assert last < MIN_PIECE or last & (last - 1) == 0, sizes
    assert sizes == sorted(sizes, reverse=True)
    assert len(sizes) <= max(1, nbytes.bit_length())


def test_a_6_gib_block_input_is_held_as_4_plus_2_gib():
    """2M tokens x 768 fp32: the pinned allocator would round one 6 GiB piece to 8 GiB."""
    assert piece_sizes(2**21 * 768 * 4) == [4 * GiB, 2 * GiB]


@pytest.mark.parametrize("make", [
    lambda: torch.randn(3, 5, 7, dtype=torch.float64),
    lambda: torch.randn(4, 6).to(torch.bfloat16).t(),             # not contiguous
    lambda: torch.arange(1000, dtype=torch.int64).view(10, 100),
    lambda: torch.rand(17) > 0.5,                                  # bool
    lambda: torch.empty(0, 3),
    lambda: torch.tensor(2.5),                                     # 0-dim
    lambda: torch.randn(MIN_PIECE // 4 * 3 + 5),                   # several pieces
])
def test_pack_unpack_round_trip_is_exact(make):
    t = make()
    hooks = HostOffload(pin_memory=False)
    packed = hooks.pack_hook(t)
    pieces = packed[-1]
    assert sum(p.numel() for p in pieces) == t.numel() * t.element_size()
    back = hooks.unpack_hook(packed)
    assert back.dtype == t.dtype and back.shape == t.shape and back.device == t.device
    assert torch.equal(back, t)
    t_copy = t.clone()
    if t.numel():  # the host copy is a copy: changing t afterwards does not reach it
        first = (0,) * t.dim()
        t[first] = ~t[first] if t.dtype == torch.bool else t[first] + 1
        assert not torch.equal(t, t_copy) and torch.equal(hooks.unpack_hook(packed), t_copy)


def test_gradients_through_host_offload_match_float64():
    """A function whose saved tensors go through HostOffload has the same gradients (float64)."""
    x = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    w = torch.randn(33, 17, dtype=torch.float64, requires_grad=True)
    ref = torch.autograd.grad((torch.tanh(x @ w) ** 2).sum(), (x, w))
    with HostOffload(pin_memory=False):
        y = (torch.tanh(x @ w) ** 2).sum()
    got = torch.autograd.grad(y, (x, w))
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
