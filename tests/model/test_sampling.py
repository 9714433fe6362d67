"""Batched sampling: parameter validation, greedy, seeds, top-k/top-p/min-p masks, penalties, logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import numpy as np

from drivers.model.sampling import SamplingParams, SamplingParamsError, SequenceSampler, log_softmax, sample

# probabilities 0.5, 0.3, 0.15, 0.05 (then a long tail of impossible tokens)
PROBS = np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32)
LOGITS = np.concatenate([np.log(PROBS), np.full(60, -1e9, dtype=np.float32)])


def draws(params: SamplingParams, n: int = 400, logits: np.ndarray = LOGITS) -> Counter:
    sampler = SequenceSampler(params)
    return Counter(sample(logits[None], [sampler])[0].token for _ in range(n))


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
    logits = np.random.default_rng(0).standard_normal((5, 100), dtype=np.float32)
    samplers = [SequenceSampler(SamplingParams(temperature=0)) for _ in range(5)]
    assert [s.token for s in sample(logits, samplers)] == logits.argmax(-1).tolist()


def test_same_seed_same_tokens_and_independent_of_batch():
    logits = np.random.default_rng(1).standard_normal((1, 300), dtype=np.float32)
    params = SamplingParams(temperature=1.0, seed=1234)

    def run(batch_with_others: bool) -> list[int]:
        mine = SequenceSampler(params)
        others = [SequenceSampler(SamplingParams(temperature=0.7, top_k=5, seed=i)) for i in range(7)]
        out = []
        for _ in range(30):
            if batch_with_others:
                rows = np.concatenate([np.repeat(logits, 3, 0), logits, np.repeat(logits, 4, 0)])
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
    logits = np.zeros((1, 1000), dtype=np.float32)
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
    rows = np.tile(LOGITS, (3, 1))
    samplers = [SequenceSampler(SamplingParams(top_k=1, seed=1)),
                SequenceSampler(SamplingParams(temperature=0)),
                SequenceSampler(SamplingParams(top_p=0.75, seed=1))]
    seen = [set() for _ in range(3)]
    for _ in range(200):
        for i, s in enumerate(sample(rows, samplers)):
            seen[i].add(s.token)
    assert seen == [{0}, {0}, {0, 1}]


def test_large_top_k_uses_full_sort():
    logits = np.random.default_rng(6).standard_normal((2, 5000), dtype=np.float32)
    samplers = [SequenceSampler(SamplingParams(top_k=3000, seed=1)), SequenceSampler(SamplingParams(top_k=2, seed=1))]
    top2 = set(np.argsort(-logits[1])[:2].tolist())
    for _ in range(50):
        assert sample(logits, samplers)[1].token in top2


def test_flat_rows_fall_back_to_the_whole_vocabulary():
    # nearly uniform over 5000 tokens: top_p=0.9 keeps ~4500, far more than the first candidates looked at
    logits = (-np.arange(5000, dtype=np.float32) * 1e-4)[None]
    seen = draws(SamplingParams(top_p=0.9, seed=8), n=300, logits=logits[0])
    assert max(seen) > 2000 and max(seen) < 4600


def test_candidate_shortcut_is_exact():
    """Drawing among the best CANDIDATES gives the same token as sorting everything, when it applies."""
    from drivers.model.sampling import CANDIDATES, _truncate_and_draw
    g = np.random.default_rng(9)
    rows = g.standard_normal((6, 8000), dtype=np.float32) * 4
    params = [SamplingParams(top_p=0.8), SamplingParams(min_p=0.1), SamplingParams(top_p=0.95, min_p=0.01),
              SamplingParams(top_k=50, top_p=0.9), SamplingParams(top_k=7), SamplingParams(top_p=0.5)]
    top_k = [p.top_k for p in params]
    for _ in range(20):
        u = g.random(6)
        fast, complete = _truncate_and_draw(rows, top_k, params, u, CANDIDATES)
        slow, _ = _truncate_and_draw(rows, top_k, params, u, 8000)
        assert complete.all()
        assert np.array_equal(fast, slow)


def test_repetition_penalty():
    logits = np.array([[3.0, 2.9, -1.0, 0.5]], dtype=np.float32)
    plain = SequenceSampler(SamplingParams(temperature=0))
    penalised = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=1.3))
    assert sample(logits, [plain], history=[[0]])[0].token == 0
    assert sample(logits, [penalised], history=[[0, 0, 3]])[0].token == 1
    # a negative logit is multiplied, not divided, so the penalty still lowers it
    neg = np.array([[-1.0, -1.2]], dtype=np.float32)
    assert sample(neg, [penalised], history=[[0]])[0].token == 1
    assert sample(neg, [penalised], history=[[]])[0].token == 0


def test_logprobs():
    logits = np.random.default_rng(7).standard_normal((2, 50), dtype=np.float32)
    samplers = [SequenceSampler(SamplingParams(temperature=0, logprobs=3)), SequenceSampler(SamplingParams(seed=1))]
    first, second = sample(logits, samplers)
    expected = log_softmax(logits.astype(np.float64))
    best = np.argsort(-expected[0])[:3]
    assert [t for t, _ in first.top] == best.tolist()
    assert [lp for _, lp in first.top] == pytest.approx(expected[0, best].tolist(), abs=1e-5)
    assert first.logprob == pytest.approx(expected[0].max(), abs=1e-5)
    assert second.top == []
    assert second.logprob == pytest.approx(expected[1, second.token], abs=1e-5)
    assert all(lp <= 0 and math.isfinite(lp) for _, lp in first.top)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="logits must be"):
        sample(np.zeros((2, 10), dtype=np.float32), [SequenceSampler()])
    with pytest.raises(ValueError, match="history"):
        sample(np.zeros((1, 10), dtype=np.float32), [SequenceSampler()], history=[[1], [2]])


def test_torch_logits_sample_as_numpy_ones_do():
    """The torch engine hands its logits over as they are; the same rows give the same picks."""
    torch = pytest.importorskip("torch", reason="torch is the torch engine's; the sampler itself is numpy")
    logits = np.random.default_rng(3).standard_normal((3, 400), dtype=np.float32)
    params = [SamplingParams(temperature=0), SamplingParams(seed=5), SamplingParams(top_p=0.9, seed=6, logprobs=2)]
    a = sample(logits, [SequenceSampler(p) for p in params])
    b = sample(torch.from_numpy(logits).to(torch.bfloat16).float(), [SequenceSampler(p) for p in params])
    c = sample(torch.from_numpy(logits), [SequenceSampler(p) for p in params])
    assert a == c
    assert len(b) == 3 and b[0].token == int(torch.from_numpy(logits[0]).to(torch.bfloat16).argmax())
