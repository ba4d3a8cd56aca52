"""The sampler: greedy, temperature, top-k/p, min-p, penalties, min_tokens and per-request seeds."""

from __future__ import annotations

import torch

from optimist.engine.request import Request, SamplingParams
from optimist.engine.sampler import sample

EOS = (2,)


def req(seed: int | None = None, **kw: object) -> Request:
    r = Request(id="r", prompt_ids=[5, 6], params=SamplingParams(seed=seed, **kw))  # type: ignore[arg-type]
    if seed is not None:
        r.generator = torch.Generator().manual_seed(seed)
    return r


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_takes_the_argmax() -> None:
    out = sample(logits([0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]), [req(temperature=0), req(temperature=0)], EOS)
    assert out.token_ids == [1, 0]


def test_top_k_one_and_tiny_top_p_and_min_p_one_reduce_to_the_argmax() -> None:
    row = [0.0, 2.0, 1.9, 1.8, -1.0]
    for params in ({"top_k": 1}, {"top_p": 0.01}, {"min_p": 1.0}):
        picks = {sample(logits(row), [req(**params)], EOS).token_ids[0] for _ in range(50)}
        assert picks == {1}, params


def test_top_k_keeps_only_the_k_best() -> None:
    row = [0.0, 2.0, 1.9, 1.8, -1.0]
    picks = {sample(logits(row), [req(top_k=2)], EOS).token_ids[0] for _ in range(300)}
    assert picks == {1, 2}


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    r = req(seed=7)
    counts = torch.zeros(3)
    for _ in range(3000):
        token = sample(logits(probs.log().tolist()), [r], EOS).token_ids[0]
        counts[token] += 1
        r.output_ids.append(token)  # a seeded request's draws differ by output position
    assert torch.allclose(counts / counts.sum(), probs, atol=0.04)


def test_a_seeded_draw_depends_only_on_the_seed_and_the_output_position() -> None:
    """However a request's tokens are grouped into steps (speculative drafts re-sample a position whose draft was
    rejected; a preempted request resumes), the token at output position n is drawn the same way."""
    row = logits(torch.randn(500).tolist())
    a, b = req(seed=99), req(seed=99)
    b.output_ids = [1, 2, 3]
    first = [sample(row.clone(), [a], EOS).token_ids[0] for _ in range(5)]
    assert len(set(first)) == 1  # position 0, again and again
    a.output_ids = [7, 7, 7]  # (which tokens came before does not matter to the draw, only how many)
    assert sample(row.clone(), [a], EOS).token_ids == sample(row.clone(), [b], EOS).token_ids
    draws = set()
    for n in range(40):
        a.output_ids = [0] * n
        draws.add(sample(row.clone(), [a], EOS).token_ids[0])
    assert len(draws) > 10  # positions draw independently


def test_seeded_requests_are_reproducible_whatever_shares_the_batch() -> None:
    row = torch.randn(1000).tolist()

    def draw(batch_with: list[Request], seed: int = 1234) -> list[int]:
        mine = req(seed=seed)
        for _ in range(20):
            rows = [row] * (1 + len(batch_with))
            mine.output_ids.append(sample(logits(*rows), [*batch_with, mine], EOS).token_ids[-1])
        return mine.output_ids

    alone = draw([])
    assert draw([req(), req(seed=99)]) == alone
    assert len(set(alone)) > 1  # really sampled, not greedy
    assert draw([], seed=4321) != alone


def test_repetition_penalty_discourages_seen_tokens() -> None:
    row = [0.0] * 10
    row[5], row[7] = 2.0, 1.9  # token 5 is in the prompt
    assert sample(logits(row), [req(temperature=0)], EOS).token_ids == [5]
    assert sample(logits(row), [req(temperature=0, repetition_penalty=1.5)], EOS).token_ids == [7]


def test_presence_and_frequency_penalties_apply_to_output_tokens() -> None:
    row = [0.0] * 10
    row[3], row[4] = 2.0, 1.5
    r = req(temperature=0, frequency_penalty=0.3)
    r.output_ids = [3]
    assert sample(logits(row), [r], EOS).token_ids == [3]  # 2.0 - 0.3 > 1.5
    r.output_ids = [3, 3]
    assert sample(logits(row), [r], EOS).token_ids == [4]  # 2.0 - 0.6 < 1.5
    r = req(temperature=0, presence_penalty=1.0)
    r.output_ids = [3]
    assert sample(logits(row), [r], EOS).token_ids == [4]


def test_min_tokens_holds_back_eos_and_stop_tokens() -> None:
    row = [0.0] * 10
    row[2], row[8], row[4] = 5.0, 4.0, 1.0
    r = req(temperature=0, min_tokens=2, stop_token_ids=(8,))
    assert sample(logits(row), [r], EOS).token_ids == [4]
    r.output_ids = [4, 4]
    assert sample(logits(row), [r], EOS).token_ids == [2]


def test_logprobs_report_the_chosen_token_and_the_top_n() -> None:
    row = [1.0, 3.0, 2.0]
    out = sample(logits(row), [req(temperature=0, logprobs=2)], EOS)
    chosen, top = out.logprobs[0]  # type: ignore[misc]
    expected = torch.tensor(row).log_softmax(0)
    assert abs(chosen - expected[1].item()) < 1e-6
    assert [t for t, _ in top] == [1, 2]
