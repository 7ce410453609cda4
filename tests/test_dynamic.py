"""Dynamic evaluation (charlstm.dynamic): lr 0 is the static figure exactly, adapting lowers the loss
on a text that repeats, the model passed in is unchanged, and the figure is deterministic."""

from __future__ import annotations

import pytest
import torch
from conftest import text_model, tiny_text, tiny_vocab

from charlstm import dynamic
from charlstm.dynamic import dynamic_evaluate, gradient_rms
from charlstm.errors import UsageError
from charlstm.evaluation import evaluate_loss

CASES = [dict(variant="lstm"), dict(variant="lstm", backend="custom"), dict(variant="gru", gru_form="cho"),
         dict(variant="mogrifier", mogrify_rounds=3)]


def ident(case: dict) -> str:
    return "-".join(str(v) for v in case.values())


@pytest.fixture(autouse=True)
def one_thread():
    """Small operations on one thread (a second one only waits on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tokens(repeat: int = 2) -> torch.Tensor:
    return torch.tensor(tiny_vocab().encode(tiny_text(repeat)), dtype=torch.long)


def snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("rule", dynamic.RULES)
@pytest.mark.parametrize("case", CASES, ids=ident)
def test_learning_rate_zero_is_the_static_figure_exactly(case, rule):
    """With lr 0 every step leaves the weights where they are (decay pulls towards them), so the
    figure and the count are evaluate_loss's with the state carried, to the last bit on the custom
    backend."""
    model = text_model(case)
    toks = tokens()
    stats = gradient_rms(model, toks, batch_size=4, seq_len=9, max_segments=5) if rule == "rms" else None
    static = evaluate_loss(model, toks, batch_size=3, seq_len=17, device="cpu")
    dyn = dynamic_evaluate(model, toks, batch_size=3, seq_len=17, lr=0.0, decay=0.1, rule=rule, grad_rms=stats)
    if model.cfg.backend == "custom":
        assert dyn == static
    else:   # nn.LSTM's CPU kernel takes another path when it records for backward: the last bits differ
        assert dyn[1] == static[1] and dyn[0] == pytest.approx(static[0], rel=1e-9, abs=0)


@pytest.mark.parametrize("rule, lr", [("sgd", 1.0), ("rms", 1e-2)])
@pytest.mark.parametrize("case", CASES[1:], ids=ident)
def test_adapting_lowers_the_loss_on_a_text_that_repeats(case, rule, lr):
    """The tiny corpus repeats its few lines: the model that adapts predicts the repeats better."""
    model = text_model(case)
    toks = tokens(6)
    stats = gradient_rms(model, toks, batch_size=4, seq_len=20) if rule == "rms" else None
    static, n = evaluate_loss(model, toks, batch_size=2, seq_len=20, device="cpu")
    dyn, m = dynamic_evaluate(model, toks, batch_size=2, seq_len=20, lr=lr, decay=dynamic.DEFAULTS.decay, rule=rule,
                              grad_rms=stats)
    assert m == n
    assert dyn < static - 0.2


def test_the_model_passed_in_is_unchanged_and_the_figure_is_deterministic():
    model = text_model(dict(variant="mogrifier", mogrify_rounds=2, mogrify_rank=2))
    model.train()
    toks = tokens()
    before = snapshot(model)
    stats = gradient_rms(model, toks, batch_size=4, seq_len=10)
    runs = [dynamic_evaluate(model, toks, batch_size=2, seq_len=10, lr=1e-3, decay=1e-2, grad_rms=stats)
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0] != evaluate_loss(model, toks, batch_size=2, seq_len=10, device="cpu")
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_gradient_statistics():
    """One root-mean-square gradient per parameter, of its shape, from at most max_segments segments."""
    model = text_model(dict(variant="lstm", backend="custom"))
    toks = tokens()
    stats = gradient_rms(model, toks, batch_size=4, seq_len=10, max_segments=3)
    assert [s.shape for s in stats] == [p.shape for p in model.parameters()]
    assert all((s >= 0).all() for s in stats) and all(s.sum() > 0 for s in stats)
    assert all(p.grad is None for p in model.parameters())
    one = gradient_rms(model, toks, batch_size=4, seq_len=10, max_segments=1)
    assert any(not torch.equal(a, b) for a, b in zip(stats, one))


def test_decay_pulls_towards_the_trained_weights():
    """With a full decay (rate 1) every step returns to the trained weights before moving: adapting
    from segment to segment is then a single step each time, worse than keeping what was learnt."""
    model = text_model(dict(variant="lstm", backend="custom"))
    toks = tokens(6)
    kept = dynamic_evaluate(model, toks, batch_size=2, seq_len=20, lr=0.3, decay=0.0, rule="sgd")
    pulled = dynamic_evaluate(model, toks, batch_size=2, seq_len=20, lr=0.3, decay=1.0, rule="sgd")
    assert kept[0] < pulled[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(rule="adam"), "rule must be one of rms, sgd"),
    (dict(lr=-1.0), "learning rate must be >= 0"),
    (dict(decay=-0.1), "decay must be >= 0"),
    (dict(rule="rms"), "needs the training gradients"),
    (dict(rule="rms", grad_rms=[torch.ones(1)]), "does not match"),
])
def test_bad_arguments_are_usage_errors(kwargs, message):
    args = dict(batch_size=2, seq_len=5, lr=1e-3, decay=1e-3, rule="sgd") | kwargs
    with pytest.raises(UsageError, match=message):
        dynamic_evaluate(text_model(), tokens(1), **args)


def test_the_adapting_copy_has_no_dropout_and_torch_rnns_in_training_mode():
    """cuDNN takes no backward in evaluation mode: the copy's nn.LSTM trains with dropout 0, the rest
    evaluates; the figure is the one evaluation mode gives (dropout 0.5 between the layers here)."""
    model = text_model(dict(variant="lstm", dropout=0.5))
    assert isinstance(model.rnn, torch.nn.LSTM) and model.rnn.dropout == 0.5
    copied = dynamic.adaptable_copy(model, "cpu")
    assert copied.rnn.training and copied.rnn.dropout == 0.0 and not copied.layer_dropout.training
    assert model.rnn.dropout == 0.5                                    # the model passed in is untouched
    toks = tokens()
    static = evaluate_loss(model, toks, batch_size=3, seq_len=17, device="cpu")
    dyn = dynamic_evaluate(model, toks, batch_size=3, seq_len=17, lr=0.0, decay=0.0, rule="sgd")
    assert dyn[1] == static[1] and dyn[0] == pytest.approx(static[0], rel=1e-9, abs=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cuDNN kernels)")
@pytest.mark.parametrize("variant", ["lstm", "gru", "rnn"])
def test_dynamic_evaluation_on_cuda_with_the_cudnn_kernels(variant, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)     # cuDNN's default products are TF32
    model = text_model(dict(variant=variant, dropout=0.2))
    toks = tokens()
    on_cpu = dynamic_evaluate(model, toks, batch_size=2, seq_len=20, lr=0.3, decay=0.0, rule="sgd")
    on_gpu = dynamic_evaluate(model, toks, batch_size=2, seq_len=20, lr=0.3, decay=0.0, rule="sgd", device="cuda")
    assert on_gpu[1] == on_cpu[1] and on_gpu[0] == pytest.approx(on_cpu[0], abs=2e-3)
