"""The chunked loss: gradients computed in forward equal the full-logits loss; memory bounded by one chunk."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels_bench.memory import torch_allocated_peak_bytes
from phi3local.train.loss import chunked_cross_entropy, plain_linear


def full_loss(hidden, targets, weight):
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits, targets.reshape(-1), reduction="sum", ignore_index=-100)


def test_gradients_of_hidden_and_trained_lm_head_equal_the_full_logits_loss():
    torch.manual_seed(0)
    hidden = torch.randn(2, 13, 24, requires_grad=True)
    head = torch.nn.Linear(24, 71, bias=False)  # trainable: the modules_to_save case
    targets = torch.randint(0, 71, (2, 13))
    targets[1, :5] = -100
    loss, _ = chunked_cross_entropy(hidden, targets, head, chunk_size=4)
    g_hidden, g_weight = torch.autograd.grad(loss * 0.5, (hidden, head.weight))
    full = full_loss(hidden, targets, head.weight)
    f_hidden, f_weight = torch.autograd.grad(full * 0.5, (hidden, head.weight))
    assert abs(float(loss.detach()) - float(full.detach())) < 1e-5 * float(full.detach())
    assert torch.allclose(g_hidden, f_hidden, atol=1e-6) and torch.allclose(g_weight, f_weight, atol=1e-6)


def test_bf16_hidden_with_fp32_trained_head_matches_the_fp32_reference():
    torch.manual_seed(1)
    hidden = torch.randn(40, 32).bfloat16().requires_grad_()
    head = torch.nn.Linear(32, 50, bias=False)
    targets = torch.randint(0, 50, (40,))
    loss, _ = chunked_cross_entropy(hidden, targets, head, chunk_size=16)
    loss.backward()
    reference = hidden.detach().float().requires_grad_()
    full = full_loss(reference, targets, head.weight.detach())
    full.backward()
    assert hidden.grad.dtype == torch.bfloat16
    # bf16 storage of the hidden gradient: relative error ~ 2^-8.
    assert torch.allclose(hidden.grad.float(), reference.grad, atol=1e-2, rtol=1e-2)
    assert abs(float(loss.detach()) - float(full.detach())) < 1e-5 * float(full.detach())


def test_peft_modules_to_save_trains_the_copy_not_the_frozen_original():
    from peft.utils import ModulesToSaveWrapper

    torch.manual_seed(2)
    head = torch.nn.Linear(16, 30, bias=False).requires_grad_(False)
    wrapper = ModulesToSaveWrapper(head, "default")
    wrapper.set_adapter("default")
    copy = plain_linear(wrapper)
    assert copy is not None and copy is not head and copy.weight.requires_grad
    hidden = torch.randn(9, 16)
    targets = torch.randint(0, 30, (9,))
    loss, _ = chunked_cross_entropy(hidden, targets, wrapper, chunk_size=4)
    loss.backward()
    expected = full_loss(hidden, targets, copy.weight.detach().requires_grad_())
    assert head.weight.grad is None and copy.weight.grad is not None
    assert abs(float(loss.detach()) - float(expected.detach())) < 1e-5 * float(expected.detach())


class MatmulsWithVocab(TorchDispatchMode):
    """Counts matrix products with a vocabulary-sized operand (the lm_head projection and its gradient)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.count = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        vocab_sized = any(torch.is_tensor(a) and self.vocab in a.shape for a in args)
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and vocab_sized:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_200k_vocabulary_peak_is_one_chunk_and_backward_reprojects_nothing():
    """Phi-4-mini's 200064-row vocabulary, 1024 trained tokens, chunks of 128 tokens.

    Peak = the profiler's tensor allocation events (kernels_bench.memory.torch_allocated_peak_bytes)
    over forward + backward, above what existed before.
    """
    vocab, width, tokens, chunk = 200064, 32, 1024, 128
    torch.manual_seed(3)
    weight = torch.randn(vocab, width) * 0.02
    head = torch.nn.Linear(width, vocab, bias=False).requires_grad_(False)
    head.weight.data = weight
    hidden = torch.randn(tokens, width, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    forward_count, backward_count = MatmulsWithVocab(vocab), MatmulsWithVocab(vocab)

    def step():
        with forward_count:
            loss, _ = chunked_cross_entropy(hidden, targets, head, chunk_size=chunk)
        with backward_count:
            loss.backward()

    peak = torch_allocated_peak_bytes(step)
    chunk_logits = chunk * vocab * 4
    full_logits = tokens * vocab * 4
    # logits + their fp32 softmax gradient reuse one buffer; the cast copy and the hidden gradient are small.
    assert peak <= 2.2 * chunk_logits, (peak, chunk_logits)
    assert peak < full_logits / 3
    assert forward_count.count == 2 * (tokens // chunk)  # logits and hidden-gradient products, per chunk
    assert backward_count.count == 0
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
