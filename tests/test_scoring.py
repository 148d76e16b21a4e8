"""Rank-classification scoring: packed log-likelihoods equal transformers' per sequence."""

import jax
import numpy as np
import pytest
from flax import nnx

from jit_tune.eval.scoring import pack_sequences, sequence_logliks
from jit_tune.models.loading import load_hf_decoder

torch = pytest.importorskip("torch")
from test_hf_parity import COMMON, RULES, _hf_model, _mesh


def _sequences(count=12, seed=0):
    """Prompt then option, the option's tokens scored (sometimes only part of them)."""
    rng = np.random.default_rng(seed)
    sequences = []
    for i in range(count):
        prompt, option = int(rng.integers(1, 20)), int(rng.integers(1, 8))
        ids = rng.integers(0, COMMON["vocab_size"], size=prompt + option)
        mask = np.r_[np.zeros(prompt, np.int32), np.ones(option, np.int32)]
        if i % 4 == 3:
            mask[prompt] = 0  # a gap: only the masked tokens count
        sequences.append((ids, mask))
    return sequences


def test_packed_scores_equal_transformers_log_likelihoods(tmp_path):
    reference = _hf_model("llama3.2", tmp_path)
    model = load_hf_decoder(tmp_path, _mesh(), RULES)
    sequences = _sequences()
    sums, counts = sequence_logliks(model, sequences, seq_len=32, rows=2)
    for (ids, mask), got, count in zip(sequences, sums, counts):
        with torch.no_grad():
            logp = torch.log_softmax(reference(torch.as_tensor(ids)[None]).logits[0], -1).numpy()
        expected = sum(logp[i - 1, ids[i]] for i in np.flatnonzero(mask))
        assert count == mask.sum()
        assert abs(got - expected) < 1e-4, (got, expected)


def test_packed_and_unpacked_agree_on_a_sharded_batch_in_fewer_rows(tmp_path):
    _hf_model("llama3.2", tmp_path)
    mesh = _mesh(jax.devices())
    model = load_hf_decoder(tmp_path, mesh, RULES)
    sequences = _sequences(40, seed=1) + [(np.asarray([7]), np.asarray([0]))]  # one token: nothing to score
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        packed = sequence_logliks(model, sequences, seq_len=32, rows=8)
        unpacked = sequence_logliks(model, sequences, seq_len=32, rows=8, packed=False)
    np.testing.assert_allclose(packed[0], unpacked[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(packed[1], unpacked[1])
    assert packed[0][-1] == 0 and packed[1][-1] == 0
    slots = [len(ids) - 1 for ids, _ in sequences[:-1]]
    assert len(pack_sequences(slots, 32)) == -(-sum(slots) // 32) == 17  # full rows, against 40 unpacked


def test_pack_sequences_fills_rows_first_fit_decreasing():
    lengths = np.random.default_rng(2).integers(1, 33, size=200).tolist()
    rows = pack_sequences(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(200))  # each exactly once
    assert all(sum(lengths[i] for i in row) <= 32 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 32) * 1.15  # near the bound of full rows
    assert pack_sequences([5, 20, 10, 3], 25) == [[1, 0], [2, 3]]


def test_too_long_a_sequence_is_an_error_naming_its_length(tmp_path):
    _hf_model("llama3.2", tmp_path)
    model = load_hf_decoder(tmp_path, _mesh(), RULES)
    too_long = (np.arange(34) % 300, np.r_[np.zeros(30, np.int32), np.ones(4, np.int32)])
    with pytest.raises(ValueError, match="sequence 1 has 34 tokens; rows of seq_len=32 .* at most 33"):
        sequence_logliks(model, [_sequences(1)[0], too_long], seq_len=32, rows=2)
    with pytest.raises(ValueError, match="mask.0. = 0"):
        sequence_logliks(model, [(np.arange(4), np.ones(4, np.int32))], seq_len=32, rows=2)
