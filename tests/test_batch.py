"""RolloutBatch: validation, views, select/concat. Milliseconds, no model."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from rltrain.batch import RolloutBatch, Source


def make_batch(**overrides) -> RolloutBatch:
    values = dict(
        train_prompt_ids=[[1, 2], [1, 2], [3], [4, 5, 6], [4, 5, 6]],
        gen_prompt_ids=[[1, 2], [1, 2, 9], [3], [4, 5, 6], [7, 4, 5, 6]],
        completion_ids=[[10, 11, 12], [13], [14, 15], [16, 17, 18, 19], [20, 21]],
        behaviour_logp=[[-0.1, -0.2, -0.3], [-1.0], [-0.5, -0.6], [-0.7, -0.8, -0.9, -1.1], [-2.0, -2.5]],
        group_ids_N=[7, 7, 3, 9, 3],
        sources=["on_policy", "hinted", "on_policy", "external", "hinted"],
        prompt_index=[0, 0, 1, 2, 1],
        truncated_N=[False, True, False, False, True],
        rewards_N=torch.tensor([1.0, 0.0, 0.5, 0.25, 1.0]),
        reward_components={"answer": torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])},
        advantages_N=torch.tensor([0.7, -0.7, 0.0, 0.3, -0.3]),
        completion_mask=[[1, 0, 1], [1], [1, 1], [0, 1, 1, 1], [1, 1]],
    )
    values.update(overrides)
    return RolloutBatch(**values)


def assert_same(a: RolloutBatch, b: RolloutBatch) -> None:
    for f in fields(RolloutBatch):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va, vb), f.name
        elif isinstance(va, dict):
            assert va.keys() == vb.keys(), f.name
            for k in va:
                assert torch.equal(va[k], vb[k]), (f.name, k)
        else:
            assert va == vb, f.name


def test_post_init_coerces_types_and_defaults_mask():
    b = make_batch(completion_mask=None)
    assert b.group_ids_N.dtype == torch.long and b.group_ids_N.tolist() == [7, 7, 3, 9, 3]
    assert b.truncated_N.dtype == torch.bool and b.truncated_N.tolist() == [False, True, False, False, True]
    assert b.completion_mask == [[1, 1, 1], [1], [1, 1], [1, 1, 1, 1], [1, 1]]
    assert b.num_tokens == 12
    assert len(b) == 5


def test_source_enum_coercion_from_strings():
    b = make_batch()
    assert b.sources == [Source.ON_POLICY, Source.HINTED, Source.ON_POLICY, Source.EXTERNAL, Source.HINTED]
    assert all(type(s) is Source for s in b.sources)
    assert b.sources[1] == "hinted"  # a str enum still compares equal to its value
    assert make_batch(sources=[Source.HINTED] * 5).sources == [Source.HINTED] * 5
    with pytest.raises(ValueError):
        make_batch(sources=["on_policy", "hinted", "on_policy", "external", "offline"])


@pytest.mark.parametrize(
    "name",
    ["train_prompt_ids", "gen_prompt_ids", "behaviour_logp", "completion_mask", "sources", "prompt_index",
     "group_ids_N", "truncated_N", "rewards_N", "advantages_N"],
)
def test_validate_names_field_with_wrong_length(name):
    value = getattr(make_batch(), name)
    with pytest.raises(ValueError, match=name):
        make_batch(**{name: value[:-1]})


def test_validate_names_reward_component_with_wrong_length():
    with pytest.raises(ValueError, match=r"reward_components\[format\]"):
        make_batch(reward_components={"answer": torch.ones(5), "format": torch.ones(4)})


def test_validate_catches_ragged_token_mismatch():
    logp = make_batch().behaviour_logp
    logp[3] = logp[3][:-1]
    with pytest.raises(ValueError, match="sample 3: completion has 4 tokens, behaviour_logp 3, mask 4"):
        make_batch(behaviour_logp=logp)
    mask = make_batch().completion_mask
    mask[0] = [1, 1]
    with pytest.raises(ValueError, match="sample 0: completion has 3 tokens, behaviour_logp 3, mask 2"):
        make_batch(completion_mask=mask)


def test_with_rewards_validates_and_casts():
    b = make_batch(rewards_N=None, reward_components={})
    r = b.with_rewards(torch.tensor([1, 0, 1, 0, 1]), {"answer": torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])})
    assert r.rewards_N.dtype == torch.float32 and r.rewards_N.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert b.rewards_N is None  # the original is unchanged
    with pytest.raises(ValueError, match="rewards_N"):
        b.with_rewards(torch.ones(3), {})


def test_groups_with_unsorted_ids_in_order_of_first_appearance():
    b = make_batch()
    groups = b.groups()
    assert groups == {7: [0, 1], 3: [2, 4], 9: [3]}
    assert list(groups) == [7, 3, 9]
    assert b.group_sizes() == [2, 2, 1]


def test_is_hinted():
    assert make_batch().is_hinted() == [False, True, False, False, True]


def test_padded_values():
    p = make_batch().padded(pad_id=-1)
    assert p["completion_ids_NT"].dtype == torch.long
    assert p["completion_ids_NT"].tolist() == [
        [10, 11, 12, -1], [13, -1, -1, -1], [14, 15, -1, -1], [16, 17, 18, 19], [20, 21, -1, -1]
    ]
    assert p["completion_mask_NT"].tolist() == [
        [1, 0, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 0, 0]
    ]
    expected_logp = torch.tensor([
        [-0.1, -0.2, -0.3, 0.0], [-1.0, 0, 0, 0], [-0.5, -0.6, 0, 0], [-0.7, -0.8, -0.9, -1.1], [-2.0, -2.5, 0, 0]
    ])
    torch.testing.assert_close(p["behaviour_logp_NT"], expected_logp)
    assert make_batch().padded()["completion_ids_NT"][1].tolist() == [13, 0, 0, 0]


def test_select_picks_rows_of_every_field():
    b = make_batch()
    s = b.select([4, 1])
    assert s.completion_ids == [[20, 21], [13]]
    assert s.gen_prompt_ids == [[7, 4, 5, 6], [1, 2, 9]]
    assert s.group_ids_N.tolist() == [3, 7]
    assert s.sources == [Source.HINTED, Source.HINTED]
    assert s.truncated_N.tolist() == [True, True]
    assert s.advantages_N.tolist() == pytest.approx([-0.3, -0.7])
    assert s.reward_components["answer"].tolist() == [1.0, 0.0]
    assert s.completion_mask == [[1, 1], [1]]
    assert_same(b.select(torch.tensor([4, 1])), s)


def test_select_concat_round_trip():
    b = make_batch()
    parts = [b.select([3, 0]), b.select([4]), b.select([2, 1])]
    joined = RolloutBatch.concat(parts)
    order = [3, 0, 4, 2, 1]
    assert_same(joined, b.select(order))
    inverse = [order.index(i) for i in range(len(b))]
    assert_same(joined.select(inverse), b)
    # Without the optional fields too.
    bare = make_batch(rewards_N=None, advantages_N=None, reward_components={})
    assert_same(RolloutBatch.concat([bare.select([0, 1]), bare.select([2, 3, 4])]), bare)


def test_concat_rejects_inconsistent_batches():
    b = make_batch()
    with pytest.raises(ValueError, match="at least one"):
        RolloutBatch.concat([])
    with pytest.raises(ValueError, match="advantages_N"):
        RolloutBatch.concat([b.select([0]), make_batch(advantages_N=None).select([1])])



def test_a_reward_component_one_batch_lacks_does_not_apply_to_its_samples():
    """E.g. an environment's reward, which demonstrations it never played may lack: NaN, TRL's "not applicable"."""
    b = make_batch()
    other = make_batch(reward_components={"format": torch.ones(5)})
    joined = RolloutBatch.concat([b.select([0, 1]), other.select([2])])
    assert set(joined.reward_components) == set(b.reward_components) | {"format"}
    assert joined.reward_components["format"][:2].isnan().all() and joined.reward_components["format"][2] == 1.0
    for name in b.reward_components:
        assert joined.reward_components[name][2].isnan()
