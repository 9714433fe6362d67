"""Batched sampling: parameter validation, greedy, seeds, top-k/top-p/min-p masks, penalties, logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from drivers.model.sampling import SamplingParams, SamplingParamsError, SequenceSampler, sample

# probabilities 0.5, 0.3, 0.15, 0.05 (then a long tail of impossible tokens)
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = torch.cat([PROBS.log(), torch.full((60,), -1e9)])


def draws(params: SamplingParams, n: int = 400, logits: torch.Tensor = LOGITS) -> Counter:
    sampler = SequenceSampler(params)
    return Counter(sample(logits.unsqueeze(0), [sampler])[0].token for _ in range(n))


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 1.0}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"seed": -1}, "seed"),
    ({"seed": True}, "seed"),
    ({"logprobs": 21}, "logprobs"),
])
def test_invalid_parameters_are_named(kwargs, message):
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**kwargs)


def test_from_dict_rejects_unknown_keys():
    assert SamplingParams.from_dict({"temperature": 0, "seed": 3}) == SamplingParams(temperature=0, seed=3)
    assert SamplingParams.from_dict(None) == SamplingParams()
    with pytest.raises(SamplingParamsError, match="temprature"):
        SamplingParams.from_dict({"temprature": 0.5})
    assert SamplingParams.from_dict(SamplingParams(top_k=4).to_dict()).top_k == 4


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    samplers = [SequenceSampler(SamplingParams(temperature=0)) for _ in range(5)]
    assert [s.token for s in sample(logits, samplers)] == logits.argmax(-1).tolist()


def test_same_seed_same_tokens_and_independent_of_batch():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=1234)

    def run(batch_with_others: bool) -> list[int]:
        mine = SequenceSampler(params)
        others = [SequenceSampler(SamplingParams(temperature=0.7, top_k=5, seed=i)) for i in range(7)]
        out = []
        for _ in range(30):
            if batch_with_others:
                rows = torch.cat([logits.repeat(3, 1), logits, logits.repeat(4, 1)])
                out.append(sample(rows, others[:3] + [mine] + others[3:])[3].token)
            else:
                out.append(sample(logits, [mine])[0].token)
        return out

    alone = run(False)
    assert alone == run(False)
    assert alone == run(True)
    other_seed = SequenceSampler(SamplingParams(temperature=1.0, seed=99))
    assert [sample(logits, [other_seed])[0].token for _ in range(30)] != alone


def test_unseeded_samplers_differ():
    logits = torch.zeros(1, 1000)
    a, b = SequenceSampler(), SequenceSampler()
    assert [sample(logits, [a])[0].token for _ in range(10)] != [sample(logits, [b])[0].token for _ in range(10)]


def test_plain_sampling_follows_the_distribution():
    counts = draws(SamplingParams(temperature=1.0, seed=5), n=2000)
    assert set(counts) <= {0, 1, 2, 3}
    for token, p in enumerate(PROBS.tolist()):
        assert abs(counts[token] / 2000 - p) < 0.04, (token, counts)


def test_top_k():
    assert set(draws(SamplingParams(top_k=1, seed=1))) == {0}
    assert set(draws(SamplingParams(top_k=2, seed=1))) == {0, 1}


def test_top_p():
    # keep the shortest prefix whose mass reaches top_p
    assert set(draws(SamplingParams(top_p=0.4, seed=2))) == {0}
    assert set(draws(SamplingParams(top_p=0.75, seed=2))) == {0, 1}
    assert set(draws(SamplingParams(top_p=0.9, seed=2))) == {0, 1, 2}


def test_min_p():
    assert set(draws(SamplingParams(min_p=0.5, seed=3))) == {0, 1}     # keeps p >= 0.25
    assert set(draws(SamplingParams(min_p=0.2, seed=3))) == {0, 1, 2}  # keeps p >= 0.1


def test_temperature_sharpens():
    cold = draws(SamplingParams(temperature=0.2, seed=4), n=300)     # p(token 0) becomes 0.93
    assert cold[0] > 260


def test_filters_combine_per_row():
    rows = LOGITS.repeat(3, 1)
    samplers = [SequenceSampler(SamplingParams(top_k=1, seed=1)),
                SequenceSampler(SamplingParams(temperature=0)),
                SequenceSampler(SamplingParams(top_p=0.75, seed=1))]
    seen = [set() for _ in range(3)]
    for _ in range(200):
        for i, s in enumerate(sample(rows, samplers)):
            seen[i].add(s.token)
    assert seen == [{0}, {0}, {0, 1}]


def test_large_top_k_uses_full_sort():
    logits = torch.randn(2, 5000, generator=torch.Generator().manual_seed(6))
    samplers = [SequenceSampler(SamplingParams(top_k=3000, seed=1)), SequenceSampler(SamplingParams(top_k=2, seed=1))]
    top2 = set(logits[1].topk(2).indices.tolist())
    for _ in range(50):
        assert sample(logits, samplers)[1].token in top2


def test_flat_rows_fall_back_to_the_whole_vocabulary():
    # nearly uniform over 5000 tokens: top_p=0.9 keeps ~4500, far more than the first candidates looked at
    logits = (-torch.arange(5000) * 1e-4).unsqueeze(0)
    seen = draws(SamplingParams(top_p=0.9, seed=8), n=300, logits=logits[0])
    assert max(seen) > 2000 and max(seen) < 4600


def test_candidate_shortcut_is_exact():
    """Drawing among the best CANDIDATES gives the same token as sorting everything, when it applies."""
    from drivers.model.sampling import CANDIDATES, _truncate_and_draw
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(6, 8000, generator=g) * 4
    params = [SamplingParams(top_p=0.8), SamplingParams(min_p=0.1), SamplingParams(top_p=0.95, min_p=0.01),
              SamplingParams(top_k=50, top_p=0.9), SamplingParams(top_k=7), SamplingParams(top_p=0.5)]
    top_k = [p.top_k for p in params]
    for _ in range(20):
        u = torch.rand(6, 1, generator=g)
        fast, complete = _truncate_and_draw(rows, top_k, params, u, CANDIDATES)
        slow, _ = _truncate_and_draw(rows, top_k, params, u, 8000)
        assert complete.all()
        assert torch.equal(fast, slow)


def test_repetition_penalty():
    logits = torch.tensor([[3.0, 2.9, -1.0, 0.5]])
    plain = SequenceSampler(SamplingParams(temperature=0))
    penalised = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=1.3))
    assert sample(logits, [plain], history=[[0]])[0].token == 0
    assert sample(logits, [penalised], history=[[0, 0, 3]])[0].token == 1
    # a negative logit is multiplied, not divided, so the penalty still lowers it
    neg = torch.tensor([[-1.0, -1.2]])
    assert sample(neg, [penalised], history=[[0]])[0].token == 1
    assert sample(neg, [penalised], history=[[]])[0].token == 0


def test_logprobs():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(7))
    samplers = [SequenceSampler(SamplingParams(temperature=0, logprobs=3)), SequenceSampler(SamplingParams(seed=1))]
    first, second = sample(logits, samplers)
    expected = torch.log_softmax(logits[0], -1)
    assert [t for t, _ in first.top] == expected.topk(3).indices.tolist()
    assert [lp for _, lp in first.top] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-6)
    assert first.logprob == pytest.approx(expected.max().item(), abs=1e-6)
    assert second.top == []
    assert second.logprob == pytest.approx(torch.log_softmax(logits[1], -1)[second.token].item(), abs=1e-6)
    assert all(lp <= 0 and math.isfinite(lp) for _, lp in first.top)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="logits must be"):
        sample(torch.zeros(2, 10), [SequenceSampler()])
    with pytest.raises(ValueError, match="history"):
        sample(torch.zeros(1, 10), [SequenceSampler()], history=[[1], [2]])
