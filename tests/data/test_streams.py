"""BatchStream: an endless, resumable, look-ahead stream of one objective's batches."""

from __future__ import annotations

import pytest

from xright_pl.data.streams import BatchStream


def _stream(n=10, batch_size=3, **kwargs):
    return BatchStream("sft", list(range(n)), batch_size, collate_fn=list, seed=7, **kwargs)


def _take(stream, count):
    out = []
    for _ in range(count):
        batch = stream.peek()
        out.append(batch)
        stream.consume(len(batch))
    return out


def test_stream_visits_every_row_once_per_epoch_and_reshuffles():
    s = _stream()
    assert len(s) == 4  # 10 rows in batches of 3: 3 + 3 + 3 + 1
    first, second = _take(s, 4), _take(s, 4)
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(10))
    assert first != second  # a new permutation each epoch
    assert (s.epoch, s.position, s.consumed_batches, s.consumed_examples) == (2, 0, 8, 20)


def test_peek_ahead_returns_the_batches_consumed_later_across_epochs():
    reference = _take(_stream(), 11)
    s = _stream()
    _take(s, 2)
    ahead = [s.peek(i) for i in range(6)]  # crosses the end of epoch 0 (4 batches)
    assert ahead == reference[2:8]
    assert (s.epoch, s.position) == (0, 2)  # looking ahead consumes nothing
    assert _take(s, 9) == reference[2:11]


def test_peek_is_stable_until_consumed():
    s = _stream()
    assert s.peek() is s.peek()
    assert s.peek(1) is s.peek(1)
    b1 = s.peek(1)
    s.consume(3)
    assert s.peek() is b1


@pytest.mark.parametrize("ahead", [0, 3, 5])
def test_restore_resumes_exactly_whatever_was_looked_ahead(ahead):
    reference = _take(_stream(), 12)
    s = _stream()
    _take(s, 5)
    for i in range(ahead):
        s.peek(i)  # fetched but not trained: not part of the state
    state = s.state()
    resumed = _stream()
    resumed.restore(state)
    assert _take(resumed, 7) == reference[5:12]
    assert resumed.consumed_examples == sum(map(len, reference[:12]))


def test_consume_without_peek_is_an_error():
    with pytest.raises(RuntimeError, match="without a peeked batch"):
        _stream().consume(3)


def test_ranks_split_each_global_batch_without_overlap():
    ranks = [_stream(n=10, batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    rows = [sum(_take(s, 3), []) for s in ranks]
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == list(range(10))
